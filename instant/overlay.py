"""The local overlay of a served disk: a sparse image file and a durable present-bitmap.

Files in the overlay directory::

    overlay.json    {"format": 1, "point", "disk", "size", "block_size"}: written last,
                    atomically, when the overlay is created; without it the directory
                    holds no overlay yet (a creation that was interrupted is redone)
    disk.img        the disk, sparse: a block whose bit is set holds its content here
    present.bitmap  one bit per block (bit n & 7 of byte n >> 3): set = disk.img holds
                    block n's content
    lock            flock'ed by the process that has the overlay open: one at a time

The rule that makes a kill -9 at any moment harmless: a block's bit is written only
after its bytes are fdatasync'ed, so a set bit always means durable content; a bit
lost in a crash only means the block is fetched again. Blocks that are zero at the
point (absent from its map) are set at creation: a fresh sparse file already reads
them as zeros.

Writes that may mark blocks (``fill``, ``write``) are serialized by one lock, and
``fill`` never overwrites a block that is already present: a block the client wrote
is never replaced by vault data fetched before the write.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.fs import atomic_write, fsync_dir

T = TypeVar("T")
HEADER, IMAGE, BITMAP = "overlay.json", "disk.img", "present.bitmap"
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class OverlayMismatch(Exception):
    """The overlay directory holds the overlay of another point, disk or geometry."""


class OverlayBusy(Exception):
    """Another process has the overlay open."""


@dataclass(frozen=True)
class OverlayHeader:
    point: str
    disk: str
    size: int
    block_size: int
    format: int = 1


class Overlay:
    """Open with ``Overlay.open``; close with ``close``. Methods run their I/O on
    ``executor``'s threads."""

    def __init__(self, folder: Path, header: OverlayHeader, bitmap: bytearray,
                 image_fd: int, bitmap_fd: int, lock_fd: int, executor: Executor) -> None:
        self.folder, self.header = folder, header
        self.size, self.block_size = header.size, header.block_size
        self.nblocks = (header.size + header.block_size - 1) // header.block_size
        self._bits = bitmap
        self._fd, self._bfd, self._lfd = image_fd, bitmap_fd, lock_fd
        self._executor = executor
        self._lock = asyncio.Lock()
        self._threads: set[concurrent.futures.Future[Any]] = set()
        self._closed = False
        self.present_count = int.from_bytes(bitmap).bit_count()

    @classmethod
    def open(cls, folder: str | os.PathLike[str], header: OverlayHeader,
             initially_present: Iterable[int], executor: Executor) -> Overlay:
        """Open the overlay in ``folder`` (created if need be), or create it with the
        blocks ``initially_present`` set. Raises OverlayMismatch if ``folder`` holds the
        overlay of something else."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise OverlayBusy(f"overlay {d} is in use by another process (an instant "
                              "recovery server already serves it); stop that one first") \
                from None
        try:
            return cls._open(d, header, initially_present, executor, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open(cls, d: Path, header: OverlayHeader, initially_present: Iterable[int],
              executor: Executor, lock_fd: int) -> Overlay:
        nbytes = ((header.size + header.block_size - 1) // header.block_size + 7) // 8
        try:
            found = OverlayHeader(**json.loads((d / HEADER).read_text()))
        except FileNotFoundError:
            found = None
        except (ValueError, TypeError) as e:
            raise OverlayMismatch(f"{d / HEADER} is not an overlay header ({e}); remove "
                                  f"the directory or give another --overlay") from None
        if found is not None and found != header:
            raise OverlayMismatch(
                f"{d} holds the overlay of point {found.point[:16]} disk {found.disk!r}, not "
                f"of point {header.point[:16]} disk {header.disk!r}; give another --overlay "
                "(or remove that one, losing its writes)")
        if found is None:
            bits = bytearray(nbytes)
            for n in initially_present:
                bits[n >> 3] |= 1 << (n & 7)
            for name, fill in ((IMAGE, None), (BITMAP, bytes(bits))):
                fd = os.open(d / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    if fill is None:
                        os.ftruncate(fd, header.size)
                    else:
                        os.pwrite(fd, fill, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(d)
            atomic_write(d / HEADER, json.dumps(asdict(header), sort_keys=True))
        image_fd = os.open(d / IMAGE, os.O_RDWR)
        bitmap_fd = os.open(d / BITMAP, os.O_RDWR)
        try:
            bits = bytearray(os.pread(bitmap_fd, nbytes, 0))
            if len(bits) != nbytes or os.fstat(image_fd).st_size != header.size:
                raise OverlayMismatch(f"{d}: {IMAGE} or {BITMAP} has the wrong size; remove "
                                      "the directory or give another --overlay")
        except BaseException:
            os.close(image_fd)
            os.close(bitmap_fd)
            raise
        return cls(d, header, bits, image_fd, bitmap_fd, lock_fd, executor)

    @property
    def image_path(self) -> Path:
        return self.folder / IMAGE

    @property
    def complete(self) -> bool:
        return self.present_count == self.nblocks

    def present(self, n: int) -> bool:
        return bool(self._bits[n >> 3] >> (n & 7) & 1)

    def missing(self) -> Iterator[int]:
        """Block numbers not present, in order (a snapshot as it iterates)."""
        for i, byte in enumerate(self._bits):
            if byte != 0xFF:
                for n in range(i * 8, min(i * 8 + 8, self.nblocks)):
                    if not byte >> (n & 7) & 1:
                        yield n

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise OSError(errno.EBADF, f"overlay {self.folder} is closed")
        cf = self._executor.submit(fn, *args)
        self._threads.add(cf)
        cf.add_done_callback(self._threads.discard)
        return await asyncio.wrap_future(cf)

    async def fill(self, blocks: list[tuple[int, bytes]]) -> int:
        """Store whole blocks fetched from the point, skipping those present already;
        make them durable, then mark them. Returns how many were stored."""
        async with self._lock:
            todo = list({n: data for n, data in blocks if not self.present(n)}.items())
            if todo:
                await self._run(self._store, todo)
            return len(todo)

    def _store(self, todo: list[tuple[int, bytes]]) -> None:
        for n, data in todo:
            _pwrite_all(self._fd, data, n * self.block_size)
        self._mark_durable([n for n, _ in todo])

    def _mark_durable(self, blocks: list[int]) -> None:
        """fdatasync the image, then set and write the bits of ``blocks``."""
        os.fdatasync(self._fd)
        for n in blocks:  # the callers pass blocks not present yet, each once
            self._bits[n >> 3] |= 1 << (n & 7)
        lo, hi = min(blocks) >> 3, (max(blocks) >> 3) + 1
        _pwrite_all(self._bfd, bytes(self._bits[lo:hi]), lo)
        self.present_count += len(blocks)

    async def write(self, offset: int, data: bytes | None, length: int, *,
                    mark: list[int], sync: bool) -> None:
        """Write ``data`` (None: zeros) at ``offset``: a client's write. ``mark`` are the
        blocks it covers whole that are not present: they are marked once durable. The
        blocks it covers in part must be present already (the caller fetched them)."""
        async with self._lock:
            mark = sorted({n for n in mark if not self.present(n)})
            await self._run(self._write, offset, data, length, mark, sync)

    def _write(self, offset: int, data: bytes | None, length: int, mark: list[int],
               sync: bool) -> None:
        if data is not None:
            _pwrite_all(self._fd, data, offset)
        else:
            self._zero(offset, length)
        if mark:
            self._mark_durable(mark)
        elif sync:
            os.fdatasync(self._fd)

    def _zero(self, offset: int, length: int) -> None:
        """Zeros over ``[offset, offset + length)``: a punched hole where the file system
        can, written zeros where it cannot."""
        if _libc.fallocate(self._fd, _PUNCH_HOLE, ctypes.c_int64(offset),
                           ctypes.c_int64(length)) == 0:
            return
        zeros = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            _pwrite_all(self._fd, zeros[:n], offset)
            offset += n

    async def read(self, offset: int, length: int) -> bytes:
        """The image's bytes (meaningful where the blocks are present)."""
        return await self._run(os.pread, self._fd, length, offset)

    async def flush(self) -> None:
        await self._run(self._flush)

    def _flush(self) -> None:
        os.fdatasync(self._fd)
        os.fdatasync(self._bfd)

    async def zero_runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(start, end)`` of the holes of the image inside ``[offset, offset+length)``."""
        return await self._run(self._holes, offset, offset + length)

    def _holes(self, start: int, end: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end  # nothing but a hole up to the end of the file
            if data > pos:
                out.append((pos, min(data, end)))
            if data >= end:
                break
            pos = os.lseek(self._fd, data, os.SEEK_HOLE)
        return out

    def close(self) -> None:
        """Close the files once the I/O threads started on them are done (a thread
        cannot be cancelled: closing under one could make it write to a reused fd)."""
        self._closed = True
        concurrent.futures.wait(list(self._threads))
        for fd in (self._fd, self._bfd):
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.close(fd)
        os.close(self._lfd)  # the lock goes with it


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
