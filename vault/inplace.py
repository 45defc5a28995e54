"""Repair a disk in place from a recovery point, writing only the blocks that differ.

The disk (a block device or an image file) is read a range of blocks at a time
(``range_blocks``: 8 MiB of the disk by default); each block is compared with the
point's block map by its keyed block id (the map's own name for the block, so nothing
but the differing blocks is read from the vault); a block the map lacks must be zero.
The blocks of the range that differ are then looked up in one batch, fetched,
authenticated and written, before the next range is read. The end-to-end disk digest is
computed from the blocks as they now stand (those compared equal and those written),
range by range, and checked against the one the point recorded.

Nothing held grows with the disk but the delta chain's maps as plaintexts (40 bytes a
mapped block, ``vault/fpstream.py``), merged as sorted streams and cut per range: no
resolved map, no whole fingerprint map, no list of every differing block.

Nothing is written to a disk that is mounted, swapped on or held (common/devicebusy.py);
a device is opened with ``O_EXCL`` so that it cannot be mounted while it is written. An
image file is truncated or extended to the point's size; a device smaller than the
point is refused, a larger one keeps what lies past the point's size. A run that fails
half-way leaves a disk that must not be used until the same repair runs again (it
compares again and writes what still differs).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from common.devicebusy import DeviceInUseError, check_not_in_use
from common.digest import DiskDigest, block_count, fingerprint, is_zero
from vault import names
from vault.errors import IntegrityError, VaultError
from vault.index import BlockIndex, Location, locate_blocks
from vault.mapchain import chain_entries
from vault.mapranges import ChainRanges
from vault.packrange import open_span, read_span
from vault.point import Point
from vault.repo import Vault

FP = 16  # bytes per fingerprint
READ_CHUNK = 8 << 20
MAX_INFLIGHT = 4
# progress(phase, done, total): phase "compare" counts bytes read, "write" bytes written
# (compared and written range by range: the write phase's total is the disk's size, an
# upper bound, until its last report, ``(written, written)``)
PhaseProgress = Callable[[str, int, int], None]


class InPlaceError(VaultError):
    """The disk cannot take the point (too small, not a disk)."""


@dataclass(frozen=True)
class InPlaceResult:
    disk: str
    path: str
    size: int
    block_size: int
    blocks_compared: int
    blocks_written: int
    bytes_written: int
    digest: str  # the end-to-end disk digest, verified against the point's


async def repair_in_place(
    vault: Vault, point: Point, disk: str, path: str, *, index: BlockIndex,
    executor: Executor | None = None, progress: PhaseProgress | None = None,
    range_blocks: int | None = None,
) -> InPlaceResult:
    """Make ``path`` hold ``disk`` of ``point``, writing only the blocks that differ
    (compared and written ``range_blocks`` blocks at a time)."""
    if range_blocks is not None and range_blocks < 1:
        raise ValueError(f"a range is at least one block, not {range_blocks}")
    entry = point.disk(disk)
    size, bs = entry.size, entry.block_size
    nblocks = block_count(size, bs)
    ranges = ChainRanges(await chain_entries(vault, point, disk), nblocks)
    check_not_in_use(path)
    fd = _open(path)
    loop = asyncio.get_running_loop()
    try:
        is_device = stat.S_ISBLK(os.fstat(fd).st_mode)
        have = os.lseek(fd, 0, os.SEEK_END)
        if is_device and have < size:
            raise InPlaceError(f"{path} holds {have} bytes; disk {disk!r} of point "
                               f"{point.id[:16]} needs {size}. Use a device at least that "
                               "large, or restore to an image file (--out)")
        if not is_device and have != size:
            os.ftruncate(fd, size)
        digest = DiskDigest()
        span = range_blocks or max(1, READ_CHUNK // bs)
        count = written = 0
        for first in range(0, nblocks, span):
            last = min(nblocks, first + span)
            await ranges.load(last)
            blocks = ranges.blocks(first, last)  # the range's mapped blocks: number -> id
            fps = bytearray(FP * (last - first))  # the range's, as its blocks now stand
            differ = await loop.run_in_executor(
                executor, _compare, vault, fd, blocks, first, last, size, bs, fps)
            if progress is not None:
                progress("compare", min(size, last * bs), size)
            if differ:
                count += len(differ)
                written = await _write_differing(vault, point, disk, fd, blocks, differ,
                                                 first, size, bs, fps, index, executor,
                                                 progress, written)
            digest.update(bytes(fps))
        await loop.run_in_executor(executor, os.fsync, fd)
    finally:
        os.close(fd)
    if progress is not None:
        progress("write", written, written)
    got = digest.hexdigest()
    if entry.digest and got != entry.digest:
        raise IntegrityError(f"points/{point.id}", f"disk {disk!r} repaired in place at {path} "
                             f"has digest {got[:16]}, recorded {entry.digest[:16]}; do not "
                             "use it: run the repair again")
    return InPlaceResult(disk, path, size, bs, nblocks, count, written, got)


def _open(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InPlaceError(f"{path} does not exist; an in-place restore repairs an existing "
                           "disk (restore to a new image with --out)") from None
    if stat.S_ISBLK(st.st_mode):
        try:
            return os.open(path, os.O_RDWR | os.O_EXCL)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceInUseError(path, "the kernel holds it open exclusively "
                                             "(mounted or claimed)") from None
            raise
    if not stat.S_ISREG(st.st_mode):
        raise InPlaceError(f"{path} is neither a block device nor an image file")
    return os.open(path, os.O_RDWR)


def _compare(vault: Vault, fd: int, blocks: dict[int, bytes], first: int, last: int,
             size: int, bs: int, fps: bytearray) -> list[int]:
    """Read blocks first..last-1; note the fingerprint of each that matches the map (in
    ``fps``, the range's) and return the numbers of those that do not."""
    block_id = vault.keyring.block_id
    lo, hi = first * bs, min(size, last * bs)
    data = os.pread(fd, hi - lo, lo)
    if len(data) < hi - lo:
        data += bytes(hi - lo - len(data))  # an image file shorter than it was: zeros
    view = memoryview(data)
    out = []
    for n in range(first, last):
        b = view[(n - first) * bs:min(hi, (n + 1) * bs) - lo]
        want = blocks.get(n)
        same = is_zero(b) if want is None else block_id(b) == want
        if same:
            fps[(n - first) * FP:(n - first + 1) * FP] = fingerprint(b)
        else:
            out.append(n)
    return out


async def _write_differing(
    vault: Vault, point: Point, disk: str, fd: int, blocks: dict[int, bytes],
    differ: list[int], first: int, size: int, bs: int, fps: bytearray, index: BlockIndex,
    executor: Executor | None, progress: PhaseProgress | None, done: int,
) -> int:
    """Write the point's content of each block in ``differ`` (of the range from block
    ``first``, whose fingerprints ``fps`` holds); return the bytes written so far, from
    ``done`` before."""
    loop = asyncio.get_running_loop()
    total = size  # an upper bound: the later ranges are not compared yet
    zeros = [n for n in differ if n not in blocks]
    if zeros:
        done += await loop.run_in_executor(executor, _write_zeros, fd, zeros, first, size, bs,
                                           fps)
        if progress is not None:
            progress("write", done, total)
    wanted = {n: blocks[n] for n in differ if n in blocks}
    by_pack = locate_blocks(index, names.POINTS + point.id, disk, wanted)
    sem = asyncio.Semaphore(MAX_INFLIGHT)

    async def one(pack_id: str, items: list[tuple[int, bytes, Location]]) -> None:
        nonlocal done
        async with sem:
            raw, lo = await read_span(vault.store, pack_id, items)
            # (not ``done += await``: that would read ``done`` before the wait, and
            # another pack's task may add to it meanwhile)
            got = await loop.run_in_executor(executor, _write_blocks, vault, pack_id, items,
                                             raw, lo, fd, first, bs, fps)
            done += got
            if progress is not None:
                progress("write", done, total)

    # Every task runs to its end before an error is raised: no thread writes to the
    # descriptor after it is closed.
    results = await asyncio.gather(*(one(p, items) for p, items in by_pack.items()),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return done


def _write_zeros(fd: int, numbers: list[int], first: int, size: int, bs: int,
                 fps: bytearray) -> int:
    done = 0
    for n in numbers:
        ln = min(bs, size - n * bs)
        zero = bytes(ln)
        os.pwrite(fd, zero, n * bs)
        fps[(n - first) * FP:(n - first + 1) * FP] = fingerprint(zero)
        done += ln
    return done


def _write_blocks(vault: Vault, pack_id: str, items: list[tuple[int, bytes, Location]],
                  raw: bytes, base: int, fd: int, first: int, bs: int, fps: bytearray
                  ) -> int:
    done = 0
    for n, data in open_span(vault.keyring, pack_id, items, raw, base):
        os.pwrite(fd, data, n * bs)
        fps[(n - first) * FP:(n - first + 1) * FP] = fingerprint(data)
        done += len(data)
    return done
