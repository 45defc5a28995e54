"""The block-layer write tracker on the real thing: ext4 (and Btrfs) on a loop device,
tracefs.

The filesystem is mounted, written through (files created, rewritten, deleted) and
unmounted between cycles, so each cycle reads a still device (``quiesced``) whose
content the test knows; every point is restored from the vault and compared byte for
byte. The tracker reads only what the block layer wrote, nothing for an unchanged
disk, and scans — counted, never a wrong point — when the trace ring buffer
overran (provoked with a one-page buffer), when the event was disabled behind its
back, and when the agent restarted (the marks were in memory). A verification scan
finds, sends and counts writes the tracker could not see. Btrfs writes differently
(copy on write, its trees duplicated, superblock copies, discards of freed space on
the loop device): the same first test runs on it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mobility.agent import Agent, CycleResult
from mobility.blocktrace import BlockTraceTracker, tracefs_root
from mobility.sender import missed
from mobility.snapshot import Quiesced
from mobility.verification import tracker_report
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import Pki, agent_config, open_vault, point_restores_to
from tests.test_ext4 import Workload, loop_device, mounted
from tests.test_tracker_btrfs import btrfs_device
from vault.materialize import materialize

DEVICE = 64 << 20
BTRFS_DEVICE = 128 << 20  # mkfs.btrfs wants at least 114 MB


@pytest.fixture
def tracefs(tmp_path: Path) -> Iterator[str]:
    if os.geteuid() != 0:
        missing_backend("root (tracefs, loop devices)", "run the suite as root")
    root = tracefs_root()
    if root is not None:
        yield root
        return
    where = tmp_path / "tracefs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tracefs", "nodev", str(where)], check=True)
    try:
        yield str(where)
    finally:
        _unmount(where)


def _unmount(where: Path) -> None:
    """Unmount a test's tracefs. A test that failed can leave a tracker's trace pipe open
    (its traceback holds the agent): collected first, and if the mount is still busy it
    is detached lazily — a tracefs left mounted in a temp folder fails the next run's
    cleanup of old temp folders."""
    if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
        return
    gc.collect()
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(where)], check=True)


@pytest.fixture
def ext4_loop(tmp_path: Path, tracefs: str) -> Iterator[str]:
    """An ext4 on a loop device, unmounted; the device's path."""
    if shutil.which("mkfs.ext4") is None:
        missing_backend("mkfs.ext4", "tests/run.sh installs e2fsprogs")
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(DEVICE)
    with loop_device(image) as dev:
        # No lazy initialisation: nothing writes in the background between cycles.
        subprocess.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        dev], check=True)
        yield dev


@pytest.fixture(params=["ext4", "btrfs"])
def fs_loop(request: pytest.FixtureRequest, tmp_path: Path, tracefs: str) -> Iterator[str]:
    """An ext4 or a Btrfs on a loop device, unmounted; the device's path."""
    if request.param == "ext4":
        yield request.getfixturevalue("ext4_loop")
        return
    with btrfs_device(tmp_path / "btrfs.img", BTRFS_DEVICE) as dev:
        yield dev


def device_size(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def device_sha(dev: str, drop: bool = True) -> str:
    fd = os.open(dev, os.O_RDONLY)
    try:
        if drop:  # the filesystem's data went around the device's cache
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def write_files(dev: str, where: Path, seed: int, files: int = 3) -> int:
    """Mount, write through the filesystem, unmount; the bytes of file data written."""
    rng = random.Random(seed)
    n = 0
    with mounted(dev, where) as mnt:
        for i in range(files):
            data = rng.randbytes(rng.randrange(64 << 10, 1 << 20))
            (mnt / f"f{seed}-{i}").write_bytes(data)
            n += len(data)
        old = sorted(mnt.glob("f*"))
        if len(old) > files:
            old[0].unlink()
    return n


async def cycle(agent: Agent, ps: ProcServer, tmp: Path, key: Path, dev: str,
                drop: bool = True) -> CycleResult:
    want = device_sha(dev, drop)
    r = await agent.replicate_once()
    await point_restores_to(ps, tmp, key, r.cycle, {"sda": want})
    return r


def make(tmp: Path, pki: Pki, port: int, dev: str, **kw: object) -> Agent:
    cfg = agent_config(tmp, pki, "vm01", port, {"sda": Path(dev)}, snapshot="quiesced",
                       tracker="blocktrace", **kw)
    cfg.validate()
    return Agent(cfg, provider=Quiesced())


def instance(tracefs: str, agent: Agent) -> Path:
    tracker = agent.trackers["sda"]
    assert isinstance(tracker, BlockTraceTracker)
    return Path(tracefs) / "instances" / tracker.instance


@pytest.mark.root
async def test_only_written_blocks_are_read_and_every_point_is_exact(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        tracefs: str, fs_loop: str) -> None:
    key, mnt, size = vault_at[1], tmp_path / "mnt", device_size(fs_loop)
    agent = make(tmp_path, pki, procserver.port, fs_loop)
    try:
        r = await cycle(agent, procserver, tmp_path, key, fs_loop)
        assert (r.kind, r.tracking) == ("full", {"sda": "scan"})
        assert instance(tracefs, agent).is_dir()  # tracing from this cycle on

        for seed in (1, 2, 3):
            written = write_files(fs_loop, mnt, seed)
            r = await cycle(agent, procserver, tmp_path, key, fs_loop)
            assert (r.kind, r.tracking, r.fallbacks) == ("delta", {"sda": "blocktrace"}, {})
            # The files' data plus the metadata the filesystem wrote: far from the whole
            # device.
            assert written <= r.bytes_read <= written + (4 << 20)

        r = await cycle(agent, procserver, tmp_path, key, fs_loop)  # nothing written
        assert (r.tracking, r.bytes_read, r.blocks_sent) == ({"sda": "blocktrace"}, 0, 0)

        # Written to the device itself and left in its page cache (no fsync, the device
        # kept open so that no last close writes it back): a read of the device sees
        # it, so the cycle must too.
        with open(fs_loop, "r+b") as f:
            f.seek(size - (1 << 20))
            f.write(os.urandom(100_000))
            f.flush()
            r = await cycle(agent, procserver, tmp_path, key, fs_loop, drop=False)
        assert r.tracking == {"sda": "blocktrace"} and r.blocks_sent == 2
    finally:
        agent.close()
    assert not instance(tracefs, agent).exists()  # the agent removes its tracing instance


@pytest.mark.root
async def test_an_overrun_a_disabled_event_or_a_restart_means_a_counted_scan(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        tracefs: str, ext4_loop: str) -> None:
    key, mnt = vault_at[1], tmp_path / "mnt"
    # A one-page ring buffer per CPU, filled on purpose faster than it is read.
    agent = make(tmp_path, pki, procserver.port, ext4_loop, blocktrace_buffer_kb=4)
    tracker = agent.trackers["sda"]
    assert isinstance(tracker, BlockTraceTracker)
    try:
        await cycle(agent, procserver, tmp_path, key, ext4_loop)
        write_files(ext4_loop, mnt, 10)
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert r.tracking == {"sda": "blocktrace"}

        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import os,sys\n"
            "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
            "for _ in range(20000): os.write(fd, b'x' * 3000)\n",
            str(instance(tracefs, agent) / "trace_marker"))
        write_files(ext4_loop, mnt, 11, files=6)
        assert await flood.wait() == 0
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert r.tracking == {"sda": "scan"} and "overran" in r.fallbacks["sda"]
        assert r.bytes_read >= DEVICE // 2 and tracker.rescans == 1

        write_files(ext4_loop, mnt, 12)  # tracing started over with the last cycle
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert (r.tracking, r.fallbacks) == ({"sda": "blocktrace"}, {})

        # Someone turns the event off: writes would go unseen.
        (instance(tracefs, agent) / "events/block/block_rq_complete/enable").write_text("0")
        write_files(ext4_loop, mnt, 13)
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert r.tracking == {"sda": "scan"} and "disabled" in r.fallbacks["sda"]
        assert tracker.rescans == 2
        write_files(ext4_loop, mnt, 14)
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert r.tracking == {"sda": "blocktrace"}
    finally:
        agent.close()

    # A restart: the marks were in memory. The writes while no agent ran are not lost.
    # A killed agent leaves its instance behind (here made by hand, tracing something
    # else): the next one replaces it.
    write_files(ext4_loop, mnt, 15)
    agent = make(tmp_path, pki, procserver.port, ext4_loop)
    left = instance(tracefs, agent)
    left.mkdir()
    (left / "events/block/block_rq_complete/filter").write_text("dev == 1")
    (left / "events/block/block_rq_complete/enable").write_text("1")
    try:
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert r.kind == "delta" and r.tracking == {"sda": "scan"}
        assert "starts with this cycle" in r.fallbacks["sda"]
        write_files(ext4_loop, mnt, 16)
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert r.tracking == {"sda": "blocktrace"}
    finally:
        agent.close()


@pytest.mark.root
async def test_a_mounted_filesystem_frozen_for_each_cycle_under_a_workload(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        tracefs: str, ext4_loop: str) -> None:
    """The writes go on during the cycles (the workload never pauses; each cycle freezes
    the filesystem for its cut and read): every point is a clean filesystem holding every
    file finished before its cycle began, and the cycles read only what was written."""
    expected: dict[str, dict[str, str]] = {}
    with mounted(ext4_loop, tmp_path / "mnt") as mnt:
        cfg = agent_config(tmp_path, pki, "vm02", procserver.port, {"sda": Path(ext4_loop)},
                           snapshot="fsfreeze", freeze_mounts=[str(mnt)],
                           tracker="blocktrace")
        cfg.validate()
        agent = Agent(cfg)
        work = Workload(mnt, seed=21)
        try:
            work.release(20)
            for i in range(4):
                before = work.snapshot()
                work.release(30)
                r = await agent.replicate_once()
                expected[r.cycle] = before
                if i:
                    assert r.tracking == {"sda": "blocktrace"}, r.fallbacks
                    assert r.bytes_read < DEVICE // 4
            work.stop()
            r = await agent.replicate_once()
            expected[r.cycle] = work.snapshot()
            assert r.tracking == {"sda": "blocktrace"}
        finally:
            if work._thread.is_alive():
                work.stop()
            agent.close()
    points = {cycle: await procserver.wait_point(cycle) for cycle in expected}
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    index = await vault.load_index()
    try:
        for cycle, files in expected.items():
            point = await vault.read_point(points[cycle])
            out = tmp_path / f"restored-{cycle[:8]}.img"
            await materialize(vault, point, "sda", str(out), index=index)
            fsck = await asyncio.create_subprocess_exec(
                "e2fsck", "-fn", str(out), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            report, _ = await fsck.communicate()
            assert fsck.returncode == 0, report.decode()
            with loop_device(out) as rdev, \
                    mounted(rdev, tmp_path / "check", "-o", "ro,noload") as check:
                for name, digest in files.items():
                    got = hashlib.sha256((check / name).read_bytes()).hexdigest()
                    assert got == digest, f"{name} differs in point {point.id}"
            out.unlink()
    finally:
        await vault.close()


@pytest.mark.root
async def test_a_verification_scan_sends_and_counts_what_the_tracker_missed(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        tracefs: str, ext4_loop: str) -> None:
    """Writes the block layer of the protected device never saw — into the loop device's
    backing file, beneath it — are invisible to the tracker; the periodic verification
    scan reads every block, sends them, counts them (the state and the heartbeat's report
    keep the count until a verification finds the tracker whole again)."""
    key, mnt = vault_at[1], tmp_path / "mnt"
    agent = make(tmp_path, pki, procserver.port, ext4_loop, tracker_verify_hours=24.0)
    bs = agent.cfg.block_size
    try:
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert r.kind == "full" and r.missed == {}
        assert tracker_report(agent)["sda"]["missed_blocks"] == 0
        write_files(ext4_loop, mnt, 20)
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert (r.tracking, r.missed) == ({"sda": "blocktrace"}, {})  # not due: 24 h

        beneath = [40, 41, (DEVICE // bs) - 3]  # blocks written under the device
        with open(tmp_path / "ext4.img", "r+b") as f:
            for n in beneath:
                f.seek(n * bs)
                f.write(os.urandom(bs))
        r = await agent.replicate_once()  # the tracker saw nothing: it reads nothing
        assert (r.tracking, r.bytes_read, r.blocks_sent, r.missed) == (
            {"sda": "blocktrace"}, 0, 0, {})

        agent.cfg = dataclasses.replace(agent.cfg, tracker_verify_hours=1e-9)  # always due
        write_files(ext4_loop, mnt, 21)
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)  # byte-exact again
        assert r.tracking == {"sda": "blocktrace"} and r.missed == {"sda": len(beneath)}
        assert r.bytes_read == DEVICE  # every block of the block device
        report = tracker_report(agent)["sda"]
        assert (report["tracker"], report["missed_blocks"]) == ("blocktrace", len(beneath))
        assert report["verified_at"] is not None

        write_files(ext4_loop, mnt, 22)
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert r.missed == {"sda": 0}  # whole again: the count is cleared
        assert tracker_report(agent)["sda"]["missed_blocks"] == 0

        agent.cfg = dataclasses.replace(agent.cfg, tracker_verify_hours=24.0)
        write_files(ext4_loop, mnt, 23)
        r = await cycle(agent, procserver, tmp_path, key, ext4_loop)
        assert r.missed == {} and r.bytes_read < DEVICE // 4
    finally:
        agent.close()


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 20)), max_size=12),
       st.lists(st.integers(0, 400), max_size=50))
def test_missed_is_the_blocks_outside_the_named_ranges(
        spans: list[tuple[int, int]], blocks: list[int]) -> None:
    named: set[int] = set()
    for lo, n in spans:
        named.update(range(lo, lo + n))
    ranges: list[tuple[int, int]] = []
    for n in sorted(named):  # sorted, disjoint, merged
        if ranges and ranges[-1][1] == n:
            ranges[-1] = (ranges[-1][0], n + 1)
        else:
            ranges.append((n, n + 1))
    claimed = tuple(ranges)
    assert missed(claimed, [lo for lo, _ in claimed], blocks) == [
        n for n in blocks if n not in named]
