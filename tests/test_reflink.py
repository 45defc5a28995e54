"""Reflink snapshots of disk images: a real XFS (reflink=1) on a loop device, and a
real Btrfs for the first test.

The images are cloned with FICLONE (no data copied), the cycle reads the clones while
the images go on changing, and the clones are deleted afterwards. With pre/post
scripts the application is held only while the clones are made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobility.agent import Agent, provider_for
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import Pki, agent_config, make_disk, mutate, point_restores_to, sha256
from tests.test_ext4 import loop_device, mounted
from tests.test_tracker_btrfs import btrfs_device

XFS_IMAGE = 320 << 20  # mkfs.xfs wants at least 300 MB
BTRFS_IMAGE = 256 << 20  # mkfs.btrfs wants at least 114 MB
DISK = 12 << 20


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A mounted XFS with reflinks, on a loop device over a sparse image file."""
    if os.geteuid() != 0:
        missing_backend("root (loop devices, mount)", "run the suite as root")
    if shutil.which("mkfs.xfs") is None:
        missing_backend("mkfs.xfs", "tests/run.sh installs xfsprogs")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(XFS_IMAGE)
    with loop_device(image) as dev:
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", dev], check=True)
        with mounted(dev, tmp_path / "mnt") as mnt:
            yield mnt


@pytest.fixture(params=["xfs", "btrfs"])
def reflink_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A mounted XFS with reflinks or a mounted Btrfs, on a loop device."""
    if request.param == "xfs":
        yield request.getfixturevalue("xfs")
        return
    with btrfs_device(tmp_path / "btrfs.img", BTRFS_IMAGE) as dev, \
            mounted(dev, tmp_path / "mnt") as mnt:
        yield mnt


def clones(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if ".sr-" in p.name)


@pytest.mark.root
async def test_cycles_read_clones_while_the_images_change(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        reflink_fs: Path) -> None:
    disk = reflink_fs / "vm.img"
    make_disk(disk, DISK, seed=1)
    log = tmp_path / "hooks.log"
    pre, post = tmp_path / "pre.sh", tmp_path / "post.sh"
    pre.write_text(f'#!/bin/sh\necho pre >> "{log}"\n')
    # The application resumes at once and writes into the image: only the clone keeps
    # the moment the point stands for.
    post.write_text(f'#!/bin/sh\necho post >> "{log}"\n'
                    f'head -c 4096 /dev/urandom | dd of="{disk}" bs=4096 seek=2 '
                    'conv=notrunc 2>/dev/null\n')
    for p in (pre, post):
        p.chmod(0o755)
    cfg = agent_config(tmp_path, pki, "vm01", procserver.port, {"sda": disk},
                       snapshot="reflink", pre_script=str(pre), post_script=str(post))
    cfg.validate()
    agent = Agent(cfg, provider=provider_for(cfg))
    try:
        for i in range(2):
            if i:
                mutate(disk, 0.05, seed=10 + i)
            at_clone = sha256(disk)
            r = await agent.replicate_once()
            assert r.consistency == "app" and r.kind == ("full" if i == 0 else "delta")
            assert sha256(disk) != at_clone  # the post-script wrote during the cycle
            await point_restores_to(procserver, tmp_path, vault_at[1], r.cycle,
                              {"sda": at_clone})
            assert clones(reflink_fs) == []
    finally:
        agent.close()
    assert log.read_text().split() == ["pre", "post"] * 2


@pytest.mark.root
async def test_several_images_without_a_freeze_are_labelled_inconsistent(
        tmp_path: Path, pki: Pki, procserver: ProcServer, xfs: Path) -> None:
    a, b = xfs / "a.img", xfs / "b.img"
    make_disk(a, 2 << 20, seed=2)
    make_disk(b, 2 << 20, seed=3)
    cfg = agent_config(tmp_path, pki, "vm02", procserver.port, {"sda": a, "sdb": b},
                       snapshot="reflink")
    agent = Agent(cfg, provider=provider_for(cfg))
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    assert r.consistency == "inconsistent"  # cloned one after the other
    assert clones(xfs) == []


async def test_images_on_a_filesystem_without_reflinks_are_refused_clearly(
        tmp_path: Path, pki: Pki, procserver: ProcServer) -> None:
    disk = tmp_path / "vm.img"  # the test directory: ext4 or tmpfs, no reflinks
    make_disk(disk, 1 << 20, seed=4)
    cfg = agent_config(tmp_path, pki, "vm03", procserver.port, {"sda": disk},
                       snapshot="reflink")
    agent = Agent(cfg, provider=provider_for(cfg))
    try:
        with pytest.raises(RuntimeError, match="filesystem with reflinks"):
            await agent.replicate_once()
    finally:
        agent.close()
    assert clones(tmp_path) == []
    assert not (Path(cfg.state_dir) / "state.json").exists()
