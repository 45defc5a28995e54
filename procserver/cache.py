"""The durable cache: HRL segment files of received frames.

A segment file is ``b"SRHRL001"`` followed by BLOCK and ZERO frames exactly as
they arrived (wire.py encoding). A segment is fsynced, with its directory,
before it is recorded as sealed; the agent is acknowledged only after every
segment of its cycle is sealed, so nothing acknowledged is lost on ``kill -9``.
A failed fsync is fatal: the process exits rather than retry (the page cache
may already have dropped the data).

``SegmentSink`` does the writing for a receiving cycle on its own thread, so the
event loop only reads the network: the session hands it runs of whole frames
(memoryviews of the receive buffers, no copy), the thread appends them with one
``writev`` per batch, and closed segments are fsynced on another thread while the
writer goes on with the next one. Recording them (the caller's ``record``) happens
on the event loop, strictly in segment order, and is never cut short: a database
transaction cancelled halfway can leave SQLite's write lock held by a connection
that is being thrown away. The bytes handed over and not yet written are bounded
(``budget``): a session that finds no room waits, stops reading, and TCP
backpressure slows the agent down.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.pacing import TokenBucket
from wire.protocol import HEADER, Frame, FrameType, ProtocolError, parse_header

SEGMENT_MAGIC = b"SRHRL001"


def fsync_or_die(fd: int, what: str) -> None:
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover - exercised only by failing disks
        sys.stderr.write(f"fatal: fsync of {what} failed: {e}; exiting to protect data\n")
        os._exit(70)


def segment_path(cycle_dir: Path, number: int) -> Path:
    return cycle_dir / f"{number:08d}.hrl"


def fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        fsync_or_die(dfd, str(path))
    finally:
        os.close(dfd)


def seal_fds(segments: list[tuple[int, Path]]) -> None:
    """fsync segments written through their fds, close them, fsync their directory once
    (blocking)."""
    try:
        for fd, path in segments:
            fsync_or_die(fd, str(path))
    finally:
        for fd, _path in segments:
            os.close(fd)
    for d in {path.parent for _fd, path in segments}:
        fsync_dir(d)


def drop_unsealed(cycle_dir: Path, first: int) -> None:
    """Delete segment files numbered ``first`` or more (never sealed: a crash cut them)."""
    for p in cycle_dir.glob("*.hrl"):
        try:
            if int(p.stem) >= first:
                p.unlink(missing_ok=True)
        except ValueError:
            continue


@dataclass(frozen=True)
class SealedSegment:
    """A closed segment of a receiving cycle, once durable: what the caller records."""

    number: int
    path: Path
    size: int
    frames: int  # frames of the cycle in this segment and every one before it
    last: tuple[int, int] | None  # highest (disk, block) among those frames


_WRITE, _CLOSE, _STOP = 0, 1, 2
# A segment being closed: (fd and size, once written) and (number, frames, last).
_Closing = tuple["asyncio.Future[tuple[int, int]]", tuple[int, int, "tuple[int, int] | None"]]
_IOV_MAX = 1024


class SinkError(OSError):
    """The cache writer failed (the cycle cannot be cached: it is aborted)."""


class SegmentSink:
    """Appends one receiving cycle's frames to its HRL segments on a writer thread."""

    def __init__(self, cycle_dir: Path, *, budget: Callable[[], int],
                 record: Callable[[list[SealedSegment]], Awaitable[None]],
                 limit: TokenBucket | None = None,
                 on_queued: Callable[[int], None] | None = None) -> None:
        self.cycle_dir, self.budget = cycle_dir, budget
        self._record, self._limit, self._on_queued = record, limit, on_queued
        self._loop = asyncio.get_running_loop()
        self._q: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._queued = 0
        self._space = asyncio.Event()
        self._error: BaseException | None = None
        # Closed segments in order; ``None`` (put by ``stop``) ends the recorder.
        self._closing: asyncio.Queue[_Closing | None] = asyncio.Queue()
        # The futures of closed segments the recorder has not dealt with yet.
        self._unsealed: set[asyncio.Future[tuple[int, int]]] = set()
        self._closed = self._recorded = 0
        self._progress = asyncio.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"hrl-{cycle_dir.name[:12]}",
                                        daemon=True)
        self._thread.start()
        self._recorder = self._loop.create_task(self._record_in_order())

    @property
    def queued(self) -> int:
        """Bytes handed to the writer thread and not yet written."""
        return self._queued

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise SinkError(f"writing the cache of cycle {self.cycle_dir.name} failed: "
                            f"{self._error}") from self._error

    # -- event loop side --------------------------------------------------------------
    async def write(self, number: int, views: list[memoryview], nbytes: int) -> None:
        """Queue whole frames for segment ``number``; wait while the budget is used up."""
        self._raise_if_failed()
        while self._queued and self._queued + nbytes > self.budget():
            self._space.clear()
            await self._space.wait()
            self._raise_if_failed()
        self._queued += nbytes
        if self._on_queued is not None:
            self._on_queued(nbytes)
        self._q.put((_WRITE, number, views, nbytes))

    def close_segment(self, number: int, frames: int, last: tuple[int, int] | None) -> None:
        """Close segment ``number`` after what was queued: sealed and recorded in order."""
        fut: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        self._q.put((_CLOSE, number, fut))
        self._closed += 1
        self._unsealed.add(fut)
        self._closing.put_nowait((fut, (number, frames, last)))

    async def sync(self) -> None:
        """Wait until every closed segment is durable and recorded (group commit)."""
        target = self._closed
        while self._recorded < target:
            self._raise_if_failed()
            self._progress.clear()
            await self._progress.wait()
        self._raise_if_failed()

    async def stop(self) -> None:
        """End the writer thread (what was queued is written), then the recorder.

        Without an error every closed segment is sealed and recorded first; after one
        (the writer's or a recording's), none is any more. Either way, when ``stop``
        returns no segment file is open here any more, and no recording is under way:
        an aborted cycle's space is free once its files are deleted."""
        if not self._stopped:
            self._stopped = True
            self._q.put((_STOP,))
            self._closing.put_nowait(None)
        await asyncio.to_thread(self._thread.join)
        # The writer has ended: a closed segment it did not hand over never will be.
        for fut in self._unsealed:
            if not fut.done():
                fut.cancel()
        await asyncio.wait([self._recorder])  # not cancelled with the caller: it ends
        if self._queued and self._on_queued is not None:
            self._on_queued(-self._queued)
            self._queued = 0

    def _released(self, n: int) -> None:
        self._queued -= n
        if self._on_queued is not None:
            self._on_queued(-n)
        self._space.set()

    def _failed(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        self._space.set()
        self._progress.set()

    async def _record_in_order(self) -> None:
        """Seal and record closed segments in order; all those waiting in one go (one
        directory fsync, one transaction: group commit). After an error, close their
        files instead. Ends at ``stop``'s ``None``; nothing else cancels it."""
        end = False
        while not end:
            batch = [await self._closing.get()]
            while not self._closing.empty():
                batch.append(self._closing.get_nowait())
            end = batch[-1] is None
            closing = [c for c in batch if c is not None]
            if not closing:
                continue
            # Each is handed over by the writer, or given up by ``stop`` (cancelled).
            await asyncio.wait([fut for fut, _meta in closing])
            self._unsealed.difference_update(fut for fut, _meta in closing)
            handed = [(fut.result(), meta) for fut, meta in closing if not fut.cancelled()]
            if self._error is not None or len(handed) < len(closing):
                for (fd, _size), _meta in handed:
                    os.close(fd)
                continue
            fds: list[tuple[int, Path]] = []
            sealed: list[SealedSegment] = []
            for (fd, size), (number, frames, last) in handed:
                path = segment_path(self.cycle_dir, number)
                fds.append((fd, path))
                sealed.append(SealedSegment(number, path, size, frames, last))
            try:
                await asyncio.to_thread(seal_fds, fds)  # closes them, whatever happens
                await self._record(sealed)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                self._failed(e)
                continue
            self._recorded += len(closing)
            self._progress.set()

    # -- writer thread ------------------------------------------------------------------
    def _hand_over(self, fut: asyncio.Future[tuple[int, int]], fd: int, size: int) -> None:
        if fut.done():  # abandoned (the cycle is being discarded): nobody will seal it
            os.close(fd)
        else:
            fut.set_result((fd, size))

    def _open(self, number: int) -> int:
        new_dir = not self.cycle_dir.is_dir()
        self.cycle_dir.mkdir(parents=True, exist_ok=True)
        if new_dir:  # the cycle directory's own entry must survive a crash too
            fsync_dir(self.cycle_dir.parent)
        fd = os.open(segment_path(self.cycle_dir, number),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        _write_all(fd, [memoryview(SEGMENT_MAGIC)])
        return fd

    def _flush(self, fd: int, iov: list[memoryview], nbytes: int) -> None:
        if not iov:
            return
        if self._limit is not None:
            self._limit.take_blocking(nbytes)
        _write_all(fd, iov)
        self._notify(self._released, nbytes)

    def _run(self) -> None:
        fd, current, size = -1, -1, 0
        try:
            while True:
                items = [self._q.get()]
                while len(items) < 256:
                    try:
                        items.append(self._q.get_nowait())
                    except queue.Empty:
                        break
                iov: list[memoryview] = []
                nbytes = 0
                for item in items:
                    if item[0] == _WRITE:
                        _, number, views, n = item
                        if number != current:
                            self._flush(fd, iov, nbytes)
                            iov, nbytes = [], 0
                            if fd >= 0:
                                os.close(fd)
                            fd, current, size = self._open(number), number, len(SEGMENT_MAGIC)
                        iov.extend(views)
                        nbytes += n
                        size += n
                    elif item[0] == _CLOSE:
                        self._flush(fd, iov, nbytes)
                        iov, nbytes = [], 0
                        _, number, fut = item
                        if number != current:  # nothing was written to it: an empty one
                            if fd >= 0:
                                os.close(fd)
                            fd, current, size = self._open(number), number, len(SEGMENT_MAGIC)
                        self._notify(self._hand_over, fut, fd, size)
                        fd, current = -1, -1
                    else:
                        self._flush(fd, iov, nbytes)
                        return
                self._flush(fd, iov, nbytes)
        except BaseException as e:
            self._notify(self._failed, e)
        finally:
            if fd >= 0:
                os.close(fd)

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _write_all(fd: int, views: list[memoryview]) -> None:
    """``writev`` every byte of ``views`` (in groups of IOV_MAX, retrying short writes)."""
    pending = [v for v in views if len(v)]
    while pending:
        done = os.writev(fd, pending[:_IOV_MAX])
        k = 0
        while k < len(pending) and done >= len(pending[k]):
            done -= len(pending[k])
            k += 1
        pending = pending[k:]
        if done:
            pending[0] = pending[0][done:]


READ_CHUNK = 4 << 20


def read_segment(path: str | Path, chunk: int = READ_CHUNK) -> Iterator[Frame]:
    """Yield the frames of a sealed segment (blocking).

    The file is read in 4 MiB pieces (reused heap memory, not a fresh mapping per
    segment); payloads are views of those pieces, not copies. (Not an mmap: a mapping
    would keep a deleted segment's disk space in use while a frame is referenced.)"""
    with open(path, "rb", buffering=0) as f:
        if f.read(len(SEGMENT_MAGIC)) != SEGMENT_MAGIC:
            raise ProtocolError("bad_segment", f"{path} is not an HRL segment")
        buf, pos = b"", 0

        def more(n: int) -> bool:
            nonlocal buf, pos
            got = f.read(max(n, chunk))
            if not got:
                return False
            buf, pos = buf[pos:] + got, 0  # keeps at most a frame's tail
            return True

        while True:
            if len(buf) - pos < HEADER.size:
                if not more(HEADER.size) and pos == len(buf):
                    return
                if len(buf) - pos < HEADER.size:
                    raise ProtocolError("truncated", f"{path}: a frame header is truncated")
            t, length = parse_header(bytes(buf[pos:pos + HEADER.size]))
            end = pos + HEADER.size + length
            while end > len(buf):
                if not more(end - len(buf)):
                    raise ProtocolError("truncated", f"{path}: a {t.name} frame is truncated")
                end = HEADER.size + length
            if t not in (FrameType.BLOCK, FrameType.ZERO):
                raise ProtocolError("bad_segment", f"{path} holds a {t.name} frame")
            yield Frame(t, memoryview(buf)[end - length:end])
            pos = end


def cache_usage(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            try:
                total += os.stat(os.path.join(dirpath, fn)).st_size
            except FileNotFoundError:
                pass
    return total


def remove_cycle_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
