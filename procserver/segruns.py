"""Sealed HRL segments read for upload as mapped runs of frames, never copied.

The uploader hands a segment's frames to the ``CycleWriter`` in runs; each run is a
read-only mapping of its part of the file, so block data are views of the page cache.
A run is unmapped as soon as none of its views is left (its blocks are sealed into
packs), which keeps the process's resident memory to the runs waiting to be sealed.

A mapping of a deleted segment keeps the file's space in use: ``Mappings`` counts the
runs of each cycle still mapped, so that an aborted cycle's space can be waited for.
"""

from __future__ import annotations

import asyncio
import gc
import mmap
import os
import weakref
from collections.abc import Iterator

from procserver.cache import SEGMENT_MAGIC
from wire.protocol import BLOCK_HEAD, HEADER, FrameType, ProtocolError, parse_header

Item = tuple[int, int, memoryview | None]


class Run:
    """A run of frames of a sealed segment for one ``CycleWriter.add``, mapped read-only:
    the block data are views of the page cache, not copies. The mapping goes as soon as
    no view of it is left (every pack holding its blocks is sealed), so the process's
    resident memory holds about the runs waiting to be sealed, not whole segments."""

    def __init__(self, fd: int, start: int, end: int,
                 frames: list[tuple[int, int, int, int]]) -> None:
        base = start - start % mmap.ALLOCATIONGRANULARITY
        self._mm = mmap.mmap(fd, end - base, offset=base, prot=mmap.PROT_READ)
        view = memoryview(self._mm)
        self.items: list[Item] = [
            (disk, n, view[off - base:off - base + ln] if ln >= 0 else None)
            for disk, n, off, ln in frames]
        view.release()  # the items' views keep the mapping exported

    def take(self) -> list[Item]:
        items, self.items = self.items, []
        return items

    def try_close(self) -> bool:
        """Unmap if no view of the run is left; say whether it is unmapped."""
        if self.items:
            return False
        try:
            self._mm.close()
        except BufferError:
            return False  # a block still waits to be sealed into a pack
        return True


class SealedSegment:
    """A sealed HRL segment, open, its frames checked and cut into runs (the constructor
    blocks: run it on a worker thread).

    Headers are read with ``pread``, not through a mapping: touching them there would
    map the whole file at once (the kernel maps the pages around a fault). Each run is
    mapped when it is handed to the writer (``map_runs``). Sealed segments are never
    truncated, so reading a mapping cannot fault; deleting the file (an aborted cycle)
    keeps it readable."""

    def __init__(self, path: str, run_bytes: int, run_frames: int) -> None:
        self.path = path
        self._run_bytes, self._run_frames = run_bytes, run_frames
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._specs = self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse(self) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
        path, fd = self.path, self._fd
        size = os.fstat(fd).st_size
        if os.pread(fd, len(SEGMENT_MAGIC), 0) != SEGMENT_MAGIC:
            raise ProtocolError("bad_segment", f"{path} is not an HRL segment")
        specs: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []
        pos = len(SEGMENT_MAGIC)
        head = HEADER.size + BLOCK_HEAD.size
        frames: list[tuple[int, int, int, int]] = []  # disk, block, data offset, length
        start, nbytes = pos, 0
        while pos < size:
            raw = os.pread(fd, head, pos)
            if len(raw) < HEADER.size:
                raise ProtocolError("truncated", f"{path}: a frame header is truncated")
            t, length = parse_header(raw[:HEADER.size])
            end = pos + HEADER.size + length
            if end > size:
                raise ProtocolError("truncated", f"{path}: a {t.name} frame is truncated")
            if t not in (FrameType.BLOCK, FrameType.ZERO) or length < BLOCK_HEAD.size:
                raise ProtocolError("bad_segment", f"{path} holds a bad {t.name} frame")
            disk, n = BLOCK_HEAD.unpack_from(raw, HEADER.size)
            data = pos + head
            frames.append((disk, n, data, end - data if t == FrameType.BLOCK else -1))
            nbytes += length
            pos = end
            if nbytes >= self._run_bytes or len(frames) >= self._run_frames or pos >= size:
                specs.append((start, pos, frames))
                frames, start, nbytes = [], pos, 0
        return specs

    def map_runs(self) -> Iterator[Run]:
        """Map the runs one by one (a cheap call: the pages are mapped when read)."""
        specs, self._specs = self._specs, []
        for start, end, frames in specs:
            yield Run(self._fd, start, end, frames)

    def close(self) -> None:
        os.close(self._fd)  # each run's mapping has a descriptor of its own


def close_released(runs: list[Run]) -> None:
    """Forget the runs that could be unmapped."""
    runs[:] = [r for r in runs if not r.try_close()]


class Mappings:
    """The runs mapped now, by cycle. A run is unmapped when its mapping is freed:
    closed by ``close_released``, or dropped with its last view, on any thread."""

    def __init__(self) -> None:
        self._live: weakref.WeakKeyDictionary[mmap.mmap, int] = weakref.WeakKeyDictionary()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def track(self, key: int, run: Run) -> None:
        """Count ``run`` as mapped for cycle ``key`` until its mapping is freed."""
        self._live[run._mm] = key
        weakref.finalize(run._mm, self._freed).atexit = False

    def mapped(self, key: int) -> int:
        return sum(1 for k in list(self._live.values()) if k == key)

    def _freed(self) -> None:
        for loop, ev in tuple(self._waiters):
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    async def wait_unmapped(self, key: int) -> None:
        """Wait until no run of cycle ``key`` is mapped (the caller bounds the wait)."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        self._waiters.add(waiter)
        try:
            while self.mapped(key):
                waiter[1].clear()
                # The last views of an abandoned upload's runs may be held only by
                # reference cycles (the tracebacks of its cancelled tasks): free them
                # now rather than at the next automatic collection.
                gc.collect()
                if self.mapped(key):
                    await waiter[1].wait()  # a thread still reads one (a pack build)
        finally:
            self._waiters.discard(waiter)
