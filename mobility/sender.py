"""Reading and sending the blocks of one cycle, in (disk, block) order.

The disks (their snapshot) are opened read-only and scanned a chunk at a time on the
agent's scan thread, ``PREFETCH`` chunks ahead of the one being sent; each chunk's
changed blocks go to the connection as one run of BLOCK/ZERO frames, paced by the
agent's send limit. After a resume, sending starts again after the position the
process server names.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.digest import digest_of_fingerprint_map
from mobility.link import Link
from mobility.tracker import CHUNK, chunks, data_extents, scan_chunk
from wire.protocol import FrameType, block_frame_parts

if TYPE_CHECKING:
    from mobility.agent import Agent

Progress = Callable[[str, int, int], None]
PREFETCH = 3  # chunks scanned ahead of the one being sent


@dataclass
class CycleDisk:
    """One disk of the cycle being sent: where to read it, its previous fingerprints
    (``old``; None for a full copy) and the new ones (``fps``)."""

    idx: int
    name: str
    path: str
    size: int
    old: bytes | None
    fps: bytearray = field(default_factory=bytearray)
    fd: int = -1
    extents: list[tuple[int, int]] | None = None


def _scan_frames(fd: int, size: int, bs: int, first: int, count: int, old: bytes | None,
                 extents: list[tuple[int, int]], fps: bytearray, full: bool, idx: int
                 ) -> tuple[bytes, int, int, int]:
    """Scan a chunk (worker thread) and encode its changed blocks as one run of frames.

    Returns the frames, how many, their data bytes and the last block number (-1: none).
    """
    parts: list[bytes | memoryview] = []
    nbytes, last = 0, -1
    changes = scan_chunk(fd, size, bs, first, count, old, extents, fps, full)
    for n, data in changes:
        if data is None:
            parts.extend(block_frame_parts(FrameType.ZERO, idx, n))
        else:
            parts.extend(block_frame_parts(FrameType.BLOCK, idx, n, data))
            nbytes += len(data)
        last = n
    return b"".join(parts), len(changes), nbytes, last


class Sender:
    """The blocks of one cycle, sent in (disk, block) order; restartable after a position."""

    def __init__(self, agent: Agent, disks: list[CycleDisk], full: bool,
                 progress: Progress | None) -> None:
        self.agent, self.disks, self.full, self.progress = agent, disks, full, progress
        self.bs = agent.cfg.block_size
        self.sent = 0  # frames the server has (after a resume: its count) plus those since
        self.nbytes = 0
        self.last: tuple[int, int] | None = None
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def open(self) -> None:
        for d in self.disks:
            d.fd = await asyncio.to_thread(_open_ro, d.path)
            d.fps = bytearray(16 * ((d.size + self.bs - 1) // self.bs))

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
            per = max(1, CHUNK // bs)
            work = [(f, c) for f, c in chunks(d.size, bs) if f + c > start]
            if work and work[0][0] < start:  # the first chunk only from ``start`` on
                f, c = work[0]
                work[0] = (start, f + c - start)
            assert all(c <= per for _f, c in work)

            def submit(i: int, d: CycleDisk = d, work: list[tuple[int, int]] = work
                       ) -> asyncio.Future[tuple[bytes, int, int, int]]:
                first, count = work[i]
                assert d.extents is not None
                return loop.run_in_executor(
                    self.agent.executor, _scan_frames, d.fd, d.size, bs, first, count,
                    None if self.full else d.old, d.extents, d.fps, self.full, d.idx)

            ahead = collections.deque(submit(i) for i in range(min(PREFETCH, len(work))))
            self._pending = ahead
            for i in range(len(work)):
                data, frames, nbytes, last = await ahead.popleft()
                if i + PREFETCH < len(work):
                    ahead.append(submit(i + PREFETCH))
                if frames:
                    await self.agent.send_limit.take(len(data))
                    link.send(data)
                    self.sent += frames
                    self.nbytes += nbytes
                    self.last = (d.idx, last)
                    await link.drain()
                if self.progress is not None:
                    first, count = work[i]
                    self.progress(d.name, min(d.size, (first + count) * bs), d.size)

    def digests(self) -> dict[str, str]:
        return {d.name: digest_of_fingerprint_map(d.fps) for d in self.disks}


def _open_ro(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        # A filesystem writes file data to the device beneath the block device's own page
        # cache: pages cached by our previous scan would be stale. Drop them first.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd
