"""The reflink extent diff on a real XFS (reflink=1) on a loop device.

The image is written through the mounted filesystem between cycles (page cache, no
fsync); every point is restored from the vault and compared byte for byte, and the
bytes each cycle read are counted: only extents that are no longer shared with the
last cycle's clone are read, and a cycle on an unchanged image reads nothing. When
the kept clone is gone, or the agent's state is from before (a reboot on an older
state directory), the cycle scans — never a wrong point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobility.agent import Agent, CycleResult, provider_for
from mobility.config import MobilityConfig
from mobility.fiemap import BATCH, differing, file_extents
from mobility.snapshot import reflink_clone
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import (
    BLOCK,
    Pki,
    agent_config,
    make_disk,
    mutate,
    point_restores_to,
    sha256,
)
from tests.test_ext4 import loop_device, mounted

XFS_IMAGE = 320 << 20  # mkfs.xfs wants at least 300 MB
DISK = 16 << 20
K = 4096


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


def kept(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if ".srtrack-" in p.name)


async def cycle(agent: Agent, ps: ProcServer, tmp: Path, key: Path, disk: Path
                ) -> CycleResult:
    """One cycle on a still image; its point must restore to exactly the image."""
    want = sha256(disk)
    r = await agent.replicate_once()
    await point_restores_to(ps, tmp, key, r.cycle, {"sda": want})
    assert sha256(disk) == want
    return r


def reflink_config(tmp: Path, pki: Pki, port: int, disk: Path) -> MobilityConfig:
    cfg = agent_config(tmp, pki, "vm01", port, {"sda": disk}, snapshot="reflink")
    cfg.validate()
    return cfg


def write_through_fs(disk: Path, offset: int, data: bytes) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.root
async def test_only_unshared_extents_are_read_and_every_point_is_exact(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        xfs: Path) -> None:
    disk = xfs / "vm.img"
    make_disk(disk, DISK, seed=1)
    key = vault_at[1]
    agent = Agent(cfg := reflink_config(tmp_path, pki, procserver.port, disk),
                  provider=provider_for(cfg))
    try:
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert (r.kind, r.tracking, r.fallbacks) == ("full", {"sda": "scan"}, {})
        assert r.bytes_read > DISK // 4  # the full copy read the image's data
        assert len(kept(xfs)) == 1  # what this cycle read, for the next one

        picks = set(mutate(disk, 0.05, seed=2))
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert (r.kind, r.tracking, r.fallbacks) == ("delta", {"sda": "reflink"}, {})
        assert 0 < r.bytes_read <= len(picks) * BLOCK
        assert r.blocks_sent <= len(picks)

        r = await cycle(agent, procserver, tmp_path, key, disk)  # nothing written
        assert (r.tracking, r.bytes_read, r.blocks_sent) == ({"sda": "reflink"}, 0, 0)

        # 100 bytes across a block boundary: the two blocks they touch, nothing more.
        write_through_fs(disk, 7 * BLOCK - 50, os.urandom(100))
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert (r.bytes_read, r.blocks_sent) == (2 * BLOCK, 2)
        assert len(kept(xfs)) == 2  # the base of this cycle and this cycle's own
    finally:
        agent.close()


@pytest.mark.root
async def test_a_lost_clone_or_an_older_state_means_a_scan_never_a_wrong_point(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        xfs: Path) -> None:
    disk = xfs / "vm.img"
    make_disk(disk, DISK, seed=3)
    key = vault_at[1]
    cfg = reflink_config(tmp_path, pki, procserver.port, disk)
    agent = Agent(cfg, provider=provider_for(cfg))
    try:
        await cycle(agent, procserver, tmp_path, key, disk)
        # The kept clone removed (by hand, a cleanup, a restore of the folder).
        for name in kept(xfs):
            (xfs / name).unlink()
        picks = mutate(disk, 0.03, seed=4)
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert r.kind == "delta" and r.tracking == {"sda": "scan"}
        assert "gone" in r.fallbacks["sda"]
        assert r.bytes_read > DISK // 4 > len(picks) * BLOCK  # a full read
        mutate(disk, 0.03, seed=5)
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert (r.tracking, r.fallbacks) == ({"sda": "reflink"}, {})
    finally:
        agent.close()

    # A restart: the kept clone and the state survive, the diff goes on from them.
    agent = Agent(cfg, provider=provider_for(cfg))
    state = Path(cfg.state_dir)
    try:
        mutate(disk, 0.03, seed=6)
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert r.tracking == {"sda": "reflink"} and r.bytes_read <= 0.03 * DISK + BLOCK
        # A reboot onto the state directory of before the last cycle: the agent compares
        # against the older cycle (or resyncs) — the point is exact either way.
        before = tmp_path / "state-before"
        shutil.copytree(state, before)
        mutate(disk, 0.03, seed=7)
        await cycle(agent, procserver, tmp_path, key, disk)
    finally:
        agent.close()
    shutil.rmtree(state)
    shutil.copytree(before, state)
    agent = Agent(cfg, provider=provider_for(cfg))
    try:
        mutate(disk, 0.03, seed=8)
        r = await cycle(agent, procserver, tmp_path, key, disk)
        mutate(disk, 0.03, seed=9)
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert r.tracking == {"sda": "reflink"}
    finally:
        agent.close()


@pytest.mark.root
def test_extent_maps_of_many_extents_are_read_whole_and_compared_exactly(xfs: Path) -> None:
    # More extents than one FIEMAP call returns (BATCH): every other 4 KiB block of a
    # clone's source rewritten, so the source alternates shared and new extents.
    image, clone = xfs / "frag.img", xfs / "frag.clone"
    size = 3 * BATCH * 2 * K
    with open(image, "wb") as f:
        f.write(os.urandom(size))
    reflink_clone(str(image), str(clone))
    written = range(0, size // K, 2)
    fd = os.open(image, os.O_WRONLY)
    try:
        for n in written:
            os.pwrite(fd, os.urandom(K), n * K)
        os.fsync(fd)
    finally:
        os.close(fd)
    new, old = file_extents(str(image), size), file_extents(str(clone), size)
    assert len(new) > BATCH and sum(e.length for e in old) == size
    assert differing(old, new, size) == [(n * K, (n + 1) * K) for n in written]
    assert differing(old, file_extents(str(clone), size), size) == []
