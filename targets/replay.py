"""A throwaway copy of one partition on which a dirty journal or log is replayed.

A crash-consistent point holds filesystems as a power cut leaves them: committed
transactions still in the ext3/4 journal or the XFS log. Checked as they are, e2fsck
guesses and xfs_repair -n reports "spurious inconsistencies" (exit 1), so every such
drill would fail. The recovered machine's kernel replays them at its first mount; the
check does the same first, on a copy, so the restored image itself is never written.

The copy holds only the partition's data extents (holes stay holes) and is made with
``copy_file_range``, which reflinks on XFS and btrfs: put ``scratch`` on the image's own
filesystem to make it cheap. It is deleted on exit, whatever happens.
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path


def copy_range_sparse(src: Path, offset: int, size: int, dst: Path) -> None:
    """Write bytes ``offset .. offset+size`` of ``src`` to a new ``dst`` of ``size``
    bytes, copying data extents only."""
    end = offset + size
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but a hole up to the end of the file
                    return
                raise
            if data >= end:
                return
            hole = min(os.lseek(fi.fileno(), data, os.SEEK_HOLE), end)
            while data < hole:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), hole - data,
                                       data, data - offset)
                if n == 0:
                    raise OSError(errno.EIO, f"{src}: short read at byte {data}")
                data += n
            pos = hole


@asynccontextmanager
async def partition_copy(image: Path, offset: int, size: int,
                         scratch: Path) -> AsyncIterator[Path]:
    """A private copy of one partition of ``image``, in ``scratch``, removed on exit."""
    fd, name = tempfile.mkstemp(prefix=".verify-replay-", suffix=".img", dir=scratch)
    os.close(fd)
    copy = Path(name)
    try:
        await asyncio.to_thread(copy_range_sparse, image, offset, size, copy)
        yield copy
    finally:
        copy.unlink(missing_ok=True)
