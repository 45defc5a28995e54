"""Write a recovery point back onto this machine's disks, only the blocks that differ:
the agent's half of a failback (and of a repair in place from the agent).

Over the agent's own session (feature ``restore``, wire/protocol.py) the agent asks for
the fingerprints of a named point (BASIS with ``point``), reads each of its disks and
compares every block's fingerprint with the point's, then fetches only the blocks that
differ (FETCH, in batches) and writes them. Each written block is checked against the
point's fingerprint: every block then holds the point's (compared equal or written and
checked), so the disk's digest is the point's map's, checked as it arrived against the
digest recorded with the point. A stretch of the disk that cannot be read cannot be
compared: it is fetched and written whole, with a warning.

Nothing held grows with a disk's size: the point's fingerprints (MAP frames) are written
to ``<disk>.failback.fp`` in the state directory as they arrive and read through a
read-only memory map (page cache, not the agent's memory; ``mobility/failbackbasis.py``);
the disk is compared a range of blocks at a time (``range_blocks``: 8 MiB of the disk by
default), the blocks that differ noted in a bitmap file (``mobility/failbackplan.py``)
and read back from it in batches to be fetched. The received map becomes the agent's
own map by a rename.

Nothing is written to a disk that is mounted, swapped on or held (common/devicebusy.py);
a block device is opened with ``O_EXCL``. An image file takes the point's size; a device
smaller than the point's disk is refused. When every disk is written and verified, the
agent's own state becomes the point (its fingerprint maps and the point's cycle as the
last cycle): the next cycle is a delta on the point, no initial copy. A failure leaves
the state as it was; the same failback run again compares again and writes what still
differs.

Resuming is idempotent: from the first write until the state is the point the disks are
marked as being written (``failback-pending``: nothing replicates them), and a run after
an interruption — a kill -9 of the agent included — reads and compares every block
again and writes only those that still differ, never one twice. What each disk differed
in when the failback first compared it is kept (``mobility/failbackplan.py``), so the
counts are the whole failback's (``blocks_written_before``: by an interrupted run).

The blocks fetched are paced by the agent's bandwidth limit (``send_limit``: the
policy's, else mobility.toml's), as its replication is: the link is the same one.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import mmap
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from common.devicebusy import DeviceInUseError, check_not_in_use
from common.digest import fingerprint
from common.fs import atomic_write, fsync_dir
from common.pacing import TokenBucket
from mobility import failbackbasis, failbackplan
from mobility.agent import Agent
from mobility.config import MobilityConfig
from mobility.failbackbasis import Basis
from mobility.failbackbasis import FailbackError as FailbackError  # (its callers' name)
from mobility.link import FOREVER, Link
from mobility.tracker import AgentState, DiskState, commit_state
from wire.protocol import (
    FINGERPRINT,
    MAX_FETCH,
    FrameType,
    ProtocolError,
    encode_json,
    raise_if_error,
)

log = structlog.get_logger("mobility.inplace")
PENDING = "failback-pending"  # in the state directory while a failback writes the disks
FP = FINGERPRINT
READ_CHUNK = 8 << 20
# progress(disk, phase, done, total): phase "compare" counts bytes read, "write" bytes written
Progress = Callable[[str, str, int, int], None]


@dataclass(frozen=True)
class DiskWritten:
    disk: str
    path: str
    size: int
    blocks_compared: int
    blocks_written: int
    bytes_written: int
    digest: str
    unreadable_blocks: int = 0  # could not be compared: written whole
    blocks_written_before: int = 0  # of blocks_written, by an interrupted earlier run


@dataclass(frozen=True)
class FailbackResult:
    point: str
    cycle: str
    disks: list[DiskWritten] = field(default_factory=list)

    @property
    def blocks_written(self) -> int:
        return sum(d.blocks_written for d in self.disks)

    @property
    def bytes_written(self) -> int:
        return sum(d.bytes_written for d in self.disks)


async def write_point(link: Link, cfg: MobilityConfig, point: str, *,
                      executor: Executor | None = None,
                      progress: Progress | None = None,
                      limit: TokenBucket | None = None,
                      range_blocks: int | None = None) -> FailbackResult:
    """Make this machine's disks hold ``point``, writing only what differs (the blocks
    fetched paced by ``limit``; each disk compared ``range_blocks`` blocks at a time);
    then the agent's state is the point's."""
    if "restore" not in link.features:
        raise FailbackError("the process server does not speak the restore feature: "
                            "upgrade it to this agent's version")
    if range_blocks is not None and range_blocks < 1:
        raise ValueError(f"a range is at least one block, not {range_blocks}")
    for d in cfg.disks:  # every disk first: nothing is written if one is in use
        check_not_in_use(d["path"])
    state_dir = Path(cfg.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    basis = await failbackbasis.receive(link, cfg, point, state_dir)
    try:
        return await _write_point(link, cfg, basis, state_dir, executor, progress, limit,
                                  range_blocks)
    finally:
        failbackbasis.drop_maps(state_dir, basis.maps)


async def _write_point(link: Link, cfg: MobilityConfig, basis: Basis, state_dir: Path,
                       executor: Executor | None, progress: Progress | None,
                       limit: TokenBucket | None, range_blocks: int | None
                       ) -> FailbackResult:
    wait = FOREVER if link.heartbeat else cfg.ack_timeout_seconds
    # From the first write until the state is the point's, the disks are neither the
    # old state nor the point: nothing may replicate them (failback_pending).
    resumed = failback_pending(state_dir)
    if resumed is not None:
        log.info("failback_resumed" if resumed == basis.point else "failback_replaced",
                 point=basis.point, pending=resumed,
                 hint="every block is compared again: only those that still differ are "
                      "written")
    atomic_write(state_dir / PENDING, basis.point)
    done: list[DiskWritten] = []
    loop = asyncio.get_running_loop()
    for d, pd in zip(cfg.disks, basis.disks, strict=True):
        fd = _open(d["path"], pd["size"])
        try:
            done.append(await _write_disk(link, basis, d["name"], d["path"], fd, pd, wait,
                                          executor, progress, limit, state_dir,
                                          range_blocks))
            await loop.run_in_executor(executor, os.fsync, fd)
        finally:
            os.close(fd)
    # Written and verified: the agent's maps are the point's, its last cycle the point's.
    disks: dict[str, DiskState] = {}
    now = time.time()
    for d, pd in zip(cfg.disks, basis.disks, strict=True):
        name = f"{d['name']}.{basis.cycle}.fp"
        m = basis.maps.pop(d["name"])
        if isinstance(m, mmap.mmap):
            m.close()
        # (fsynced as it was received)
        os.replace(failbackbasis.map_path(state_dir, d["name"]), state_dir / name)
        disks[d["name"]] = DiskState(pd["size"], pd["block_size"], name, verified_at=now)
    fsync_dir(state_dir)
    commit_state(state_dir, AgentState(basis.cycle, disks))
    failbackplan.clear(state_dir)
    (state_dir / PENDING).unlink(missing_ok=True)
    result = FailbackResult(basis.point, basis.cycle, done)
    log.info("point_written_in_place", point=basis.point, cycle=basis.cycle,
             blocks_written=result.blocks_written, bytes_written=result.bytes_written,
             disks={w.disk: w.blocks_written for w in done},
             blocks_written_before=sum(w.blocks_written_before for w in done))
    return result


def _open(path: str, size: int) -> int:
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDWR | os.O_EXCL)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceInUseError(path, "the kernel holds it open exclusively "
                                             "(mounted or claimed)") from None
            raise
        if os.lseek(fd, 0, os.SEEK_END) < size:
            os.close(fd)
            raise FailbackError(f"{path} is smaller than the point's disk ({size} bytes)")
        return fd
    if not stat.S_ISREG(st.st_mode):
        raise FailbackError(f"{path} is neither a block device nor an image file")
    fd = os.open(path, os.O_RDWR)
    if os.lseek(fd, 0, os.SEEK_END) != size:
        os.ftruncate(fd, size)
    return fd


def _compare(fd: int, first: int, last: int, size: int, bs: int, want: bytes
             ) -> tuple[list[int], int]:
    """Blocks first..last-1 whose fingerprint differs from ``want``'s (the point's
    fingerprints of those blocks), and how many of them could not be read at all (they
    differ by assumption)."""
    lo, hi = first * bs, min(size, last * bs)
    try:
        data = os.pread(fd, hi - lo, lo)
    except OSError as e:
        log.warning("failback_unreadable", blocks=f"{first}-{last - 1}", error=str(e),
                    hint="these blocks cannot be compared: they are written whole")
        return list(range(first, last)), last - first
    if len(data) < hi - lo:
        data += bytes(hi - lo - len(data))
    view = memoryview(data)
    out = []
    for n in range(first, last):
        fp = fingerprint(view[(n - first) * bs:min(hi, (n + 1) * bs) - lo])
        if fp != want[(n - first) * FP:(n - first + 1) * FP]:
            out.append(n)
    return out, 0


async def _write_disk(link: Link, basis: Basis, name: str, path: str, fd: int,
                      pd: dict[str, Any], wait: float, executor: Executor | None,
                      progress: Progress | None, limit: TokenBucket | None,
                      state_dir: Path, range_blocks: int | None) -> DiskWritten:
    loop = asyncio.get_running_loop()
    size: int = pd["size"]
    bs: int = pd["block_size"]
    n: int = pd["blocks"]
    want = basis.maps[name]
    tail = size - (n - 1) * bs  # the last block's length

    def nbytes(count: int, last: bool) -> int:
        return count * bs - (bs - tail if last else 0)

    bits = failbackplan.todo(state_dir, name, basis.point, n)
    unreadable = 0
    span = range_blocks or max(1, READ_CHUNK // bs)
    try:
        for first in range(0, n, span):
            last = min(n, first + span)
            got, bad = await loop.run_in_executor(executor, _compare, fd, first, last, size,
                                                  bs, want[first * FP:last * FP])
            bits.add(got, last)
            unreadable += bad
            if progress is not None:
                progress(name, "compare", min(size, last * bs), size)
        await loop.run_in_executor(executor, bits.close)
    except BaseException:
        bits.abandon()
        raise
    before, before_last = await loop.run_in_executor(
        executor, failbackplan.written_before, state_dir, name, basis.point, bits)
    total = nbytes(bits.count, bits.last)
    written = count = 0
    todo = failbackplan.blocks(bits)
    while batch := list(itertools.islice(todo, MAX_FETCH)):
        link.send(encode_json(FrameType.FETCH, {"point": basis.point, "disk": name,
                                                "blocks": batch}))
        for b in batch:
            f = await link.recv(wait)
            raise_if_error(f)
            if f.type not in (FrameType.BLOCK, FrameType.ZERO):
                raise ProtocolError("bad_fetch", f"expected BLOCK, got {f.type.name}")
            _disk, num, data = f.block()
            ln = min(bs, size - b * bs)
            if num != b or (f.type == FrameType.BLOCK and len(data) != ln):
                raise ProtocolError("bad_fetch", f"block {num} ({len(data)} bytes) instead "
                                                 f"of block {b} ({ln} bytes)")
            if limit is not None and f.type == FrameType.BLOCK:
                await limit.take(ln)
            block = bytes(data) if f.type == FrameType.BLOCK else bytes(ln)
            if fingerprint(block) != want[b * FP:(b + 1) * FP]:
                raise ProtocolError("bad_fetch", f"block {b} of disk {name!r} does not "
                                                 "match the point's fingerprint")
            await loop.run_in_executor(executor, os.pwrite, fd, block, b * bs)
            written += ln
            count += 1
            if progress is not None:
                progress(name, "write", written, total)
        end = await link.recv(wait)
        raise_if_error(end)
        if end.type != FrameType.FETCH or end.json().get("blocks") != len(batch):
            raise ProtocolError("bad_fetch", f"expected the end of FETCH, got {end.type.name}")
    # Every block compared equal to the point's fingerprint or was written and checked
    # against it: the disk's map is the point's, whose digest was checked as it arrived.
    digest = basis.digests[name]
    if count != bits.count or (pd.get("digest") and digest != pd["digest"]):
        raise FailbackError(f"disk {name!r} at {path} does not hold point "
                            f"{basis.point[:16]} after the writes ({count} of {bits.count} "
                            "differing blocks written); do not use it: run the failback "
                            "again")
    if unreadable:
        log.warning("failback_written_whole", disk=name, blocks=unreadable,
                    hint="blocks that could not be read were written from the point")
    if before:
        log.info("failback_disk_resumed", disk=name, blocks_written_now=count,
                 blocks_written_before=before)
    return DiskWritten(name, path, size, n, count + before,
                       written + nbytes(before, before_last), digest, unreadable, before)


async def failback(agent: Agent, point: str, progress: Progress | None = None,
                   range_blocks: int | None = None) -> FailbackResult:
    """Connect as the agent does for a cycle and write ``point`` onto its disks."""
    link = await agent._connect_retrying()  # the cycle's own connection, retries included
    try:
        return await write_point(link, agent.cfg, point, executor=agent.executor,
                                 progress=progress, limit=agent.send_limit,
                                 range_blocks=range_blocks)
    finally:
        await link.close()


def failback_pending(state_dir: str | Path) -> str | None:
    """The point an interrupted failback was writing onto the disks, if any: until it
    is written whole, the disks must not be replicated."""
    try:
        return (Path(state_dir) / PENDING).read_text().strip() or None
    except FileNotFoundError:
        return None
