"""The LVM snapshot provider's orchestration, with stand-in ``lvs``/``lvcreate``/``lvremove``.

This machine has no device-mapper, so real LVM cannot run here. The stand-ins keep
LVM's command-line contract (the same arguments and outputs) over image files: a
"logical volume" is a file under ``dev/VG/LV`` and a snapshot is a copy taken by
``lvcreate``. What is tested is ours: which commands run in which order, that the
cycle reads the snapshot and not the disk that goes on changing, that the post-script
runs as soon as the snapshots exist, that snapshots are always removed, and the
labels. Everything else (agent, TLS, process server, vault, restore) is real.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from mobility.agent import Agent, provider_for
from mobility.config import MobilityConfig
from procserver.server import ProcServer
from tests.helpers import Pki, agent_config, make_disk, point_restores_to, sha256

LVS = """#!/bin/sh
# lvs --noheadings -o vg_name,lv_name PATH | lvs --noheadings -o lv_path VG/LV
echo "lvs $*" >> "$LVM_LOG"
field="$3"; target="$4"
case "$field" in
  vg_name,lv_name)
    case "$target" in
      "$LVM_DEV"/*/*) rel="${target#"$LVM_DEV"/}"; echo "  ${rel%%/*} ${rel#*/}";;
      *) echo "  Failed to find logical volume \\"$target\\"" >&2; exit 5;;
    esac;;
  lv_path) echo "  $LVM_DEV/$target";;
esac
"""
LVCREATE = """#!/bin/sh
# lvcreate --snapshot --name NAME (-l N%ORIGIN | -L SIZE) VG/LV
echo "lvcreate $*" >> "$LVM_LOG"
name="$3"; origin="$6"; vg="${origin%%/*}"
if [ -n "$LVM_FAIL_ON" ] && [ "$origin" = "$LVM_FAIL_ON" ]; then
  echo "  Insufficient free space: 256 extents needed, but only 0 available" >&2; exit 5
fi
cp --sparse=always "$LVM_DEV/$origin" "$LVM_DEV/$vg/$name"
# The workload goes on writing at once: only the snapshot keeps the moment.
if [ -n "$LVM_SCRIBBLE" ]; then
  printf 'written after the snapshot' |
    dd of="$LVM_DEV/$origin" bs=1 seek=4096 conv=notrunc 2>/dev/null
fi
"""
LVREMOVE = """#!/bin/sh
echo "lvremove $*" >> "$LVM_LOG"
rm -f "$LVM_DEV/$2"
"""


@dataclasses.dataclass
class Lvm:
    dev: Path
    log: Path

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def lv(self, vg: str, name: str, size: int, seed: int) -> Path:
        path = self.dev / vg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make_disk(path, size, seed=seed)
        return path

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.dev.rglob("*-sr-*"))


@pytest.fixture
def lvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lvm:
    bin_dir = tmp_path / "lvm-bin"
    bin_dir.mkdir()
    for name, text in (("lvs", LVS), ("lvcreate", LVCREATE), ("lvremove", LVREMOVE)):
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    dev = tmp_path / "dev"
    dev.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LVM_DEV", str(dev))
    monkeypatch.setenv("LVM_LOG", str(tmp_path / "lvm.log"))
    return Lvm(dev, tmp_path / "lvm.log")


def lvm_agent(tmp: Path, pki: Pki, ps: ProcServer, disks: dict[str, Path],
              **kw: object) -> tuple[Agent, MobilityConfig]:
    cfg = agent_config(tmp, pki, "lvm01", ps.port, disks, snapshot="lvm", **kw)
    cfg.validate()
    return Agent(cfg, provider=provider_for(cfg)), cfg


async def test_cycle_reads_the_snapshot_while_the_disk_changes(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        lvm: Lvm, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = lvm.lv("vg0", "data", 8 << 20, seed=1)
    at_snapshot = sha256(disk)
    monkeypatch.setenv("LVM_SCRIBBLE", "1")
    agent, _cfg = lvm_agent(tmp_path, pki, procserver, {"sda": disk})
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    assert sha256(disk) != at_snapshot  # the disk moved on during the cycle ...
    assert r.consistency == "crash"
    # ... and the point holds the moment of the snapshot.
    await point_restores_to(procserver, tmp_path, vault_at[1], r.cycle, {"sda": at_snapshot})
    calls = lvm.calls()
    assert [c.split()[0] for c in calls] == ["lvs", "lvcreate", "lvs", "lvremove"]
    assert calls[1].startswith("lvcreate --snapshot --name data-sr-") and \
        calls[1].endswith("-l 10%ORIGIN vg0/data")
    assert lvm.leftovers() == []


async def test_scripts_around_lvm_release_the_application_before_the_send(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        lvm: Lvm) -> None:
    a = lvm.lv("vg1", "db", 4 << 20, seed=2)
    pre, post = tmp_path / "pre.sh", tmp_path / "post.sh"
    pre.write_text(f'#!/bin/sh\necho pre >> "{lvm.log}"\n')
    post.write_text(f'#!/bin/sh\necho post >> "{lvm.log}"\n')
    for p in (pre, post):
        p.chmod(0o755)
    agent, _cfg = lvm_agent(tmp_path, pki, procserver, {"sda": a},
                            pre_script=str(pre), post_script=str(post),
                            lvm_snapshot_size="512M")
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    steps = [c.split()[0] for c in lvm.calls()]
    # The application is quiesced only for the snapshots; removal comes after the send.
    assert steps == ["pre", "lvs", "lvcreate", "lvs", "post", "lvremove"]
    assert all("-L 512M" in c for c in lvm.calls() if c.startswith("lvcreate"))
    assert r.consistency == "app"
    await point_restores_to(procserver, tmp_path, vault_at[1], r.cycle, {"sda": sha256(a)})
    assert lvm.leftovers() == []


async def test_several_disks_without_a_freeze_are_labelled_inconsistent(
        tmp_path: Path, pki: Pki, procserver: ProcServer, lvm: Lvm) -> None:
    a, b = lvm.lv("vg0", "a", 2 << 20, seed=4), lvm.lv("vg0", "b", 2 << 20, seed=5)
    agent, _cfg = lvm_agent(tmp_path, pki, procserver, {"sda": a, "sdb": b})
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    # Snapshots taken one after the other are not one moment of both disks.
    assert r.consistency == "inconsistent"
    assert lvm.leftovers() == []


async def test_a_failed_snapshot_fails_the_cycle_and_removes_the_others(
        tmp_path: Path, pki: Pki, procserver: ProcServer, lvm: Lvm,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = lvm.lv("vg0", "a", 2 << 20, seed=6), lvm.lv("vg0", "b", 2 << 20, seed=7)
    monkeypatch.setenv("LVM_FAIL_ON", "vg0/b")
    agent, cfg = lvm_agent(tmp_path, pki, procserver, {"sda": a, "sdb": b})
    try:
        with pytest.raises(RuntimeError, match="Insufficient free space"):
            await agent.replicate_once()
    finally:
        agent.close()
    assert [c.split()[0] for c in lvm.calls()][-1] == "lvremove"  # the one that was made
    assert lvm.leftovers() == []
    assert not (Path(cfg.state_dir) / "state.json").exists()  # nothing committed


async def test_a_disk_that_is_not_a_logical_volume_is_refused(
        tmp_path: Path, pki: Pki, procserver: ProcServer, lvm: Lvm) -> None:
    plain = tmp_path / "plain.img"
    make_disk(plain, 1 << 20, seed=8)
    agent, _cfg = lvm_agent(tmp_path, pki, procserver, {"sda": plain})
    try:
        with pytest.raises(RuntimeError, match="Failed to find logical volume"):
            await agent.replicate_once()
    finally:
        agent.close()
    assert [c.split()[0] for c in lvm.calls()] == ["lvs"]


@pytest.mark.parametrize("size", ["10%", "lots", "%ORIGIN", "5 G", ""])
def test_bad_snapshot_size_is_refused(tmp_path: Path, pki: Pki, size: str) -> None:
    cfg = agent_config(tmp_path, pki, "lvm01", 9443, {"sda": tmp_path / "d"},
                       snapshot="lvm", lvm_snapshot_size=size)
    with pytest.raises(ValueError, match="lvm_snapshot_size"):
        cfg.validate()
