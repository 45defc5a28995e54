"""Upload a raw disk image as a fixed VHD page blob: only its non-zero ranges, in
parallel, resumable.

The blob is the VHD's bytes: the raw image zero-padded to a whole number of MiB
(``vault.vhd.vhd_size``), then the 512-byte fixed-VHD footer (``vault.vhd.build_footer``).
A page blob reads back zeros wherever nothing was written, so the zero ranges of the
image need no upload at all.

Resumable: Azure applies each Put Page whole or not at all, and this module writes
every extent with exactly one Put Page, so an extent that ``list_page_ranges`` shows
fully written is there and is skipped on a re-run. The footer is written last, after
every data extent, so a blob whose footer page is written is complete. The blob
carries the identity of the image it was made from (size, mtime, inode) in its
metadata; a blob of another image under the same name is deleted and made anew,
never patched.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob import BlobType
from azure.storage.blob.aio import BlobClient

from common.backoff import Backoff
from common.digest import is_zero
from vault.store.azure import is_transient
from vault.vhd import FOOTER_SIZE, build_footer, vhd_size

PAGE = 512  # page blobs are written in whole 512-byte pages
MAX_PUT = 4 << 20  # one Put Page writes at most 4 MiB
GRANULE = 4 << 10  # zero detection works on 4 KiB blocks (a filesystem block)
READ_BLOCK = MAX_PUT
SCAN_WINDOW = 16 * MAX_PUT  # the scan reads ahead of the uploads this much at a time
SOURCE_KEY = "siterecovery_source"  # blob metadata: the image the blob was made from


class PageBlobError(Exception):
    """An upload failed; ``message`` says which blob and why (never a credential)."""


@dataclass(frozen=True)
class UploadReport:
    blob: str
    url: str
    vhd_size: int  # the VHD's virtual size: the image padded to whole MiB
    blob_size: int  # vhd_size + the footer
    extents: int  # non-zero extents in the image
    uploaded: int  # extents written by this run (the footer not counted)
    skipped: int  # extents already in the blob from an earlier run
    bytes_uploaded: int


def image_identity(path: Path) -> str:
    """What names one restored image: size, mtime and inode (images are written once)."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _data_regions(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The (start, end) regions of [start, end) of the file that may hold data: holes
    skipped."""
    regions: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past pos
                break
            return [(start, end)]  # the filesystem cannot say: read it all (correct, slower)
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        regions.append((data, hole))
        pos = hole
    return regions


def nonzero_extents(path: Path, start: int = 0, end: int | None = None, *,
                    granule: int = GRANULE, max_extent: int = MAX_PUT) -> list[tuple[int, int]]:
    """The (offset, length) extents of ``path`` in [start, end) that hold a non-zero byte.

    Zero detection is per ``granule`` bytes (aligned); adjacent non-zero granules are
    merged into one extent of at most ``max_extent`` bytes, aligned so that no extent
    crosses a ``max_extent`` boundary. ``start`` and ``end`` (default: the file's size)
    are multiples of ``max_extent``, or ``end`` is the size. The last extent may end at
    the image's size, which need not be a multiple of 512 (the uploader pads it with
    zeros). Blocking: run it in a thread."""
    if max_extent % granule or granule % PAGE:
        raise ValueError("granule must be a multiple of 512 and divide max_extent")
    size = path.stat().st_size
    end = size if end is None else min(end, size)
    if start % max_extent or (end != size and end % max_extent):
        raise ValueError(f"scan window {start}-{end} is not aligned to {max_extent}")
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for rstart, rend in _data_regions(fd, start, end):
            block = rstart - rstart % max_extent
            while block < rend:
                data = os.pread(fd, min(max_extent, end - block), block)
                if not is_zero(data):
                    run_start = -1
                    for i in range(0, len(data), granule):
                        nonzero = not is_zero(data[i:i + granule])
                        if nonzero and run_start < 0:
                            run_start = i
                        elif not nonzero and run_start >= 0:
                            out.append((block + run_start, i - run_start))
                            run_start = -1
                    if run_start >= 0:
                        out.append((block + run_start, len(data) - run_start))
                block += max_extent
    finally:
        os.close(fd)
    # Regions may share a block (a hole inside one max_extent block): drop repeats.
    return sorted(set(out))


def _covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Is [start, end) inside one of the merged, sorted [s, e) ``ranges``?"""
    i = bisect.bisect_right(ranges, start, key=lambda r: r[0]) - 1
    return i >= 0 and ranges[i][0] <= start and end <= ranges[i][1]


async def written_ranges(blob: BlobClient) -> list[tuple[int, int]]:
    """The blob's written page ranges as merged, sorted [start, end) pairs."""
    raw: list[tuple[int, int]] = []
    async for r in blob.list_page_ranges():
        if not r.cleared and r.start is not None and r.end is not None:
            raw.append((r.start, r.end + 1))  # the service's end is inclusive
    raw.sort()
    merged: list[tuple[int, int]] = []
    for s, e in raw:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


async def _prepare(blob: BlobClient, size: int, identity: str) -> None:
    """Make sure ``blob`` is a page blob of ``size`` bytes made from ``identity``."""
    try:
        props = await blob.get_blob_properties()
    except ResourceNotFoundError:
        props = None
    if props is not None:
        same = (props.blob_type == BlobType.PAGEBLOB and props.size == size
                and (props.metadata or {}).get(SOURCE_KEY) == identity)
        if same:
            return
        await blob.delete_blob(delete_snapshots="include")
    await blob.create_page_blob(size, metadata={SOURCE_KEY: identity})


async def upload_vhd(
    blob: BlobClient,
    image: Path,
    *,
    concurrency: int = 8,
    retries: int = 4,
    backoff: Callable[[], Backoff] = Backoff,
    scan_window: int = SCAN_WINDOW,
    on_extent: Callable[[int, int], None] | None = None,
) -> UploadReport:
    """Write ``image`` (a raw disk) to ``blob`` as a fixed VHD page blob; return what it did.

    Uploads the non-zero extents ``concurrency`` at a time, then the footer. Resumes a
    blob left by an interrupted run of the same image. ``on_extent(offset, length)`` is
    called after each extent is written. A transient failure (no answer, 408, 429, 5xx)
    of one page write is retried ``retries`` times, waiting ``backoff()``'s delays. The
    image is scanned ``scan_window`` bytes at a time while earlier extents upload.
    Raises ``PageBlobError`` on any other storage failure or when the retries are spent
    (what was written stays, for the next run to resume); cancellation propagates."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if scan_window <= 0 or scan_window % MAX_PUT:
        raise ValueError(f"scan_window must be a positive multiple of {MAX_PUT}")
    raw_size = image.stat().st_size
    if raw_size == 0:
        raise PageBlobError(f"{image} is empty: there is no disk to upload")
    vsize = vhd_size(raw_size)
    total = vsize + FOOTER_SIZE
    name = blob.blob_name
    try:
        await _prepare(blob, total, image_identity(image))
        present = await written_ranges(blob)
    except AzureError as e:
        raise PageBlobError(f"cannot prepare page blob {name!r}: {_reason(e)}") from None
    footer_there = _covered(present, vsize, total)
    extents = uploaded = uploaded_bytes = 0
    # The scan feeds the uploads as it goes: the first pages leave while later windows
    # are read, and a bounded queue keeps the scan from running far ahead.
    queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue(maxsize=2 * concurrency)

    async def scan() -> None:
        nonlocal extents
        for start in range(0, raw_size, scan_window):
            found = await asyncio.to_thread(nonzero_extents, image, start, start + scan_window)
            extents += len(found)
            for off, length in found:
                if not _covered(present, off, off + _pages(length)):
                    await queue.put((off, length))
        for _ in range(concurrency):
            await queue.put(None)  # one end mark per worker

    async def worker() -> None:
        nonlocal uploaded, uploaded_bytes
        while (item := await queue.get()) is not None:
            off, length = item
            data = await asyncio.to_thread(_read, image, off, length)
            if len(data) != length:
                raise PageBlobError(f"{image} changed while uploading: short read at {off}")
            data += bytes(_pages(length) - length)  # the image's tail, padded to a page
            await _put(blob, data, off, retries, backoff())
            uploaded += 1
            uploaded_bytes += len(data)
            if on_extent is not None:
                on_extent(off, len(data))

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(scan())
            for _ in range(concurrency):
                tg.create_task(worker())
    except* PageBlobError as eg:
        raise eg.exceptions[0] from None
    if not footer_there or uploaded:
        # Last, and again when any extent was written: the footer marks a whole blob.
        await _put(blob, build_footer(vsize), vsize, retries, backoff())
    # Without the query: a client made with a SAS carries the token in its URLs, and this
    # URL goes into templates and job records.
    url = blob.url.split("?", 1)[0]
    return UploadReport(blob=name, url=url, vhd_size=vsize, blob_size=total,
                        extents=extents, uploaded=uploaded, skipped=extents - uploaded,
                        bytes_uploaded=uploaded_bytes)


def _read(path: Path, offset: int, length: int) -> bytes:
    # Its own descriptor per read: a cancelled upload leaves no shared one to close
    # under a read still running in its thread.
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


async def _put(blob: BlobClient, data: bytes, offset: int, retries: int,
               backoff: Backoff) -> None:
    """One Put Page of ``data`` at ``offset``, retried while the failure is transient."""
    while True:
        try:
            await blob.upload_page(data, offset=offset, length=len(data), validate_content=True)
            return
        except AzureError as e:
            # One classification of transient Azure failures: the vault store's.
            if not is_transient(e) or backoff.failures >= retries:
                tries = backoff.failures + 1
                raise PageBlobError(f"cannot write {len(data)} bytes at {offset} of page blob "
                                    f"{blob.blob_name!r} ({tries} tries): {_reason(e)}") from None
        await backoff.sleep()


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _reason(e: AzureError) -> str:
    code = getattr(e, "error_code", None) or getattr(e, "status_code", None)
    return f"{type(e).__name__}: {code or e.message}"
