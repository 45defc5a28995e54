"""Reading and sending the blocks of one cycle, in (disk, block) order.

The disks (their snapshot) are opened read-only and scanned a chunk at a time on the
agent's scan thread, ``PREFETCH`` chunks ahead of the one being sent; each chunk's
changed blocks go to the connection as one run of BLOCK/ZERO frames, paced by the
agent's send limit. After a resume, sending starts again after the position the
process server names.

Which blocks are read comes from each disk's change tracker (``changes.py``), asked
once the snapshot is held: the blocks it names (the others keep the base's
fingerprints), or, on a ``Rescan`` and for full copies, every block. ``nread`` counts
the bytes read from the disks.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from common.digest import block_count, digest_of_fingerprint_map
from mobility import newmap
from mobility.changes import Changed, Rescan, Tracker
from mobility.link import Link
from mobility.newmap import NewMap
from mobility.tracker import OldMap, Piece, data_extents, scan_chunk, work
from wire.protocol import FrameType, block_frame_parts

if TYPE_CHECKING:
    from mobility.agent import Agent

Progress = Callable[[str, int, int], None]
PREFETCH = 3  # chunks scanned ahead of the one being sent
log = structlog.get_logger("mobility")


@dataclass
class CycleDisk:
    """One disk of the cycle being sent: where to read it, its previous fingerprints
    (``old``; None for a full copy), the new ones (``fps``: a memory-mapped file,
    ``newmap.py``) and the block ranges its tracker named (``ranges``; None: every
    block)."""

    idx: int
    name: str
    path: str
    size: int
    old: OldMap | None
    fps: NewMap = field(default_factory=bytearray)
    fd: int = -1
    extents: list[tuple[int, int]] | None = None
    ranges: tuple[tuple[int, int], ...] | None = None
    # A verification scan: the ranges the tracker named, while every block is read.
    claimed: tuple[tuple[int, int], ...] | None = None


def missed(claimed: tuple[tuple[int, int], ...], starts: list[int], blocks: list[int]
           ) -> list[int]:
    """The ``blocks`` outside the sorted, disjoint ``claimed`` ranges (``starts``: their
    first blocks)."""
    out = []
    for n in blocks:
        i = bisect.bisect_right(starts, n) - 1
        if i < 0 or n >= claimed[i][1]:
            out.append(n)
    return out


def _scan_frames(fd: int, size: int, bs: int, pieces: list[Piece], old: OldMap | None,
                 extents: list[tuple[int, int]], fps: NewMap, full: bool, idx: int,
                 claimed: tuple[tuple[int, int], ...] | None = None
                 ) -> tuple[bytes, int, int, int, int, list[int]]:
    """Scan the pieces of a chunk (worker thread) and encode their changed blocks as one
    run of frames.

    Returns the frames, how many, their data bytes, the last block number (-1: none),
    the bytes read and (a verification scan: ``claimed`` given) the changed blocks the
    tracker did not name.
    """
    parts: list[bytes | memoryview] = []
    frames = nbytes = nread = 0
    last = -1
    outside: list[int] = []
    starts = [lo for lo, _ in claimed] if claimed is not None else []
    for first, count in pieces:
        changes, got = scan_chunk(fd, size, bs, first, count, old, extents, fps, full)
        nread += got
        frames += len(changes)
        if claimed is not None and changes:
            outside += missed(claimed, starts, [n for n, _ in changes])
        for n, data in changes:
            if data is None:
                parts.extend(block_frame_parts(FrameType.ZERO, idx, n))
            else:
                parts.extend(block_frame_parts(FrameType.BLOCK, idx, n, data))
                nbytes += len(data)
            last = n
    return b"".join(parts), frames, nbytes, last, nread, outside


class Sender:
    """The blocks of one cycle, sent in (disk, block) order; restartable after a position."""

    def __init__(self, agent: Agent, disks: list[CycleDisk], full: bool,
                 progress: Progress | None, *, cycle: str = "", base: str | None = None,
                 verify: frozenset[str] = frozenset()) -> None:
        """``base``: the agent's last acknowledged cycle when ``disks``' ``old`` maps are
        its own (a delta), the trackers' reference; None: every block is read.
        ``verify``: the disks due for a verification scan (read whole even if their
        tracker names ranges; what changed outside them is counted in ``missed``)."""
        self.agent, self.disks, self.full, self.progress = agent, disks, full, progress
        self.cycle, self.base = cycle, None if full else base
        self.bs = agent.cfg.block_size
        self.sent = 0  # frames the server has (after a resume: its count) plus those since
        self.nbytes = 0
        self.nread = 0  # bytes read from the disks (snapshots), re-reads included
        self.tracking: dict[str, str] = {}  # disk -> what found its changes
        self.fallbacks: dict[str, str] = {}  # disk -> why its tracker asked for a scan
        self.verify = verify
        # disk -> the changed blocks its tracker missed (verification scans only)
        self.missed: dict[str, set[int]] = {}
        self.last: tuple[int, int] | None = None
        self.started = False  # the first block data went to the connection
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def open(self) -> None:
        """Open the disks and ask each one's tracker what to read.

        A tracker with a ``stage`` method (libvirt) makes the snapshot file itself: it
        is given what this cycle reads (``ranges``; None: every block) before it is
        opened."""
        for d in self.disks:
            tracker = self.agent.trackers.get(d.name)
            stage = getattr(tracker, "stage", None)
            if stage is None:
                d.fd = await asyncio.to_thread(_open_ro, d.path)
            d.fps = await asyncio.to_thread(newmap.create, self.agent.state_dir, d.name,
                                            self.cycle, 16 * block_count(d.size, self.bs))
            if tracker is not None:
                await self._ask(d, tracker)
            if stage is not None:
                await asyncio.to_thread(stage, d.path, d.size, self.bs, d.ranges)
                d.fd = await asyncio.to_thread(_open_ro, d.path)

    async def _ask(self, d: CycleDisk, tracker: Tracker) -> None:
        answer = await asyncio.to_thread(tracker.changes, self.base, self.cycle, d.path,
                                         d.size, self.bs)
        if isinstance(answer, Changed) and d.old is not None and len(d.old) == len(d.fps):
            self.tracking[d.name] = tracker.kind
            if d.name in self.verify:  # read every block, compare with what it named
                d.claimed = answer.ranges
                self.missed[d.name] = set()
                log.info("tracker_verification_scan", disk=d.name, tracker=tracker.kind,
                         named_blocks=answer.blocks)
            else:
                d.ranges, d.fps[:] = answer.ranges, d.old
            return
        self.tracking[d.name] = "scan"
        if tracker.kind != "scan" and self.base is not None:
            reason = (answer.reason if isinstance(answer, Rescan)
                      else "no fingerprint map of the base cycle")
            self.fallbacks[d.name] = reason
            log.warning("tracker_fell_back_to_scan", disk=d.name, tracker=tracker.kind,
                        reason=reason)

    async def close(self) -> None:
        await self._settle()
        for d in self.disks:
            if d.fd >= 0:
                await asyncio.to_thread(os.close, d.fd)
                d.fd = -1

    async def _settle(self) -> None:
        while self._pending:
            with contextlib.suppress(Exception):
                await self._pending.popleft()

    def rewind(self, blocks: int, position: tuple[int, int] | None) -> None:
        self.sent, self.last = blocks, position

    async def send(self, link: Link) -> None:
        """Send every block after ``self.last``."""
        await self._settle()
        loop = asyncio.get_running_loop()
        bs = self.bs
        for d in self.disks:
            if self.last is not None and d.idx < self.last[0]:
                continue
            start = self.last[1] + 1 if self.last is not None and d.idx == self.last[0] else 0
            if d.extents is None:
                d.extents = await asyncio.to_thread(data_extents, d.fd, d.size)
            todo = work(d.size, bs, d.ranges, start)

            def submit(i: int, d: CycleDisk = d, todo: list[list[Piece]] = todo
                       ) -> asyncio.Future[tuple[bytes, int, int, int, int, list[int]]]:
                assert d.extents is not None
                return loop.run_in_executor(
                    self.agent.executor, _scan_frames, d.fd, d.size, bs, todo[i],
                    None if self.full else d.old, d.extents, d.fps, self.full, d.idx,
                    d.claimed)

            ahead = collections.deque(submit(i) for i in range(min(PREFETCH, len(todo))))
            self._pending = ahead
            for i in range(len(todo)):
                data, frames, nbytes, last, nread, outside = await ahead.popleft()
                self.nread += nread
                if outside:  # a set: a resume may read a chunk twice
                    self.missed[d.name].update(outside)
                if i + PREFETCH < len(todo):
                    ahead.append(submit(i + PREFETCH))
                if frames:
                    await self.agent.send_limit.take(len(data))
                    if not self.started:
                        self.started = True
                        log.info("cycle_send_started", cycle=self.cycle)
                    link.send(data)
                    self.sent += frames
                    self.nbytes += nbytes
                    self.last = (d.idx, last)
                    await link.drain()
                if self.progress is not None:
                    first, count = todo[i][-1]
                    self.progress(d.name, min(d.size, (first + count) * bs), d.size)

    def read_whole(self) -> set[str]:
        """The disks this cycle read every block of (full copy, scan, verification)."""
        return {d.name for d in self.disks if d.ranges is None}

    def digests(self) -> dict[str, str]:
        return {d.name: digest_of_fingerprint_map(d.fps) for d in self.disks}


def _open_ro(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        # A filesystem writes file data to the device beneath the block device's own page
        # cache: pages cached by our previous scan would be stale. Drop them first.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd
