"""A file's extent map (``FS_IOC_FIEMAP``) and where two maps differ.

Two files that map a byte to the same physical location, with the same flags, hold
the same byte there as long as neither file is written: that is what a reflink clone
shares with its source. ``differing`` lists the byte ranges where two maps may not
agree — a superset of where the files can differ — and reads as differing whatever it
cannot vouch for.

Filesystems (tested on XFS and on Btrfs with and without ``compress=zstd``):

- Plain extents (XFS, Btrfs without compression) are compared byte by byte through
  their location: the same ``physical - logical`` means the same bytes on disk, however
  either map splits or merges its extents.
- Encoded extents (``FIEMAP_EXTENT_ENCODED``: Btrfs compression, at most 128 KiB each)
  report the start of the whole compressed extent as their location, whichever part of
  it the file uses; a location says nothing about a byte inside. Such an extent counts
  as unchanged only where both maps report the very same extent — same start, length,
  location and flags — and anything else of it is read (a write into a compressed
  extent reads the pieces of the extent around it too). A write splits an extent into
  pieces that keep their offsets into it, so under ordinary writes the same start and
  location means the same piece of the same compressed data. What an extent map
  cannot tell apart: a range remapped into the image from elsewhere (``FICLONERANGE``)
  at exactly the offset and length of an earlier piece of the same compressed extent,
  and two compressed extents the kernel reports merged because the second happens to
  lie exactly one logical length after the first, twice with the same total — the
  periodic verification scan covers these.
- Extents whose location says nothing about their content (``UNCOMPARABLE``: not yet
  placed, unknown, inline, tail-packed, not aligned, encrypted), extents cut at a
  batch boundary while encoded, and extents with a flag this module does not know are
  always read, never skipped.
- Dirty data is written back first (``FIEMAP_FLAG_SYNC``), so no delayed allocation is
  left on a file nobody writes, such as a reflink clone.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

# linux/fs.h: _IOWR('f', 11, struct fiemap); struct fiemap is 32 bytes.
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1  # write dirty data back first: no delayed allocation left

FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_MERGED = 0x1000
FIEMAP_EXTENT_SHARED = 0x2000

# Extents whose location says nothing reliable about their content: always read.
UNCOMPARABLE = (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC
                | FIEMAP_EXTENT_DATA_ENCRYPTED | FIEMAP_EXTENT_NOT_ALIGNED
                | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_DATA_TAIL)
# Flags that describe the mapping, not the content: ignored when comparing.
_IGNORED = FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_MERGED | FIEMAP_EXTENT_SHARED
KNOWN = (UNCOMPARABLE | _IGNORED | FIEMAP_EXTENT_ENCODED | FIEMAP_EXTENT_UNWRITTEN)
# Set on an encoded extent that ``extents`` had to cut (above the kernel's 32 bits):
# the part kept is not the extent the kernel reported, so it is read.
CUT = 1 << 32

_HEAD = struct.Struct("=QQIIII")  # fm_start fm_length fm_flags fm_mapped fm_count reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical fe_physical fe_length ... fe_flags ...
BATCH = 2048  # extents per ioctl


class FiemapError(Exception):
    """The extent map cannot be used to tell what is unchanged (the message says why)."""


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length


def extents(fd: int, size: int) -> list[Extent]:
    """The extents of the open file ``fd`` in ``[0, size)``, sorted by logical offset,
    after its dirty data is written back (``FIEMAP_FLAG_SYNC``), with their flags as
    reported (``differing`` decides what they allow).

    Raises ``FiemapError`` if the filesystem has no FIEMAP."""
    out: list[Extent] = []
    pos = 0
    buf = bytearray(_HEAD.size + _EXTENT.size * BATCH)
    while pos < size:
        _HEAD.pack_into(buf, 0, pos, size - pos, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError as e:
            raise FiemapError(f"FIEMAP failed: {e.strerror}") from None
        mapped = _HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            lo, phys, length, flags = _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
            if lo < pos:  # overlaps the previous batch: keep only what is new
                cut = pos - lo
                lo, phys, length = pos, phys + cut, length - cut
                if flags & FIEMAP_EXTENT_ENCODED:
                    flags |= CUT
            if length > 0 and lo < size:
                out.append(Extent(lo, phys, min(length, size - lo), flags))
            pos = max(pos, lo + length)
            last = bool(flags & FIEMAP_EXTENT_LAST)
        if last:
            break
    return out


def file_extents(path: str, size: int) -> list[Extent]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return extents(fd, size)
    finally:
        os.close(fd)


def comparable(e: Extent) -> bool:
    """Whether ``e``'s location can vouch for its bytes at all (see the docstring)."""
    return not (e.flags & (UNCOMPARABLE | CUT) or e.flags & ~KNOWN)


def _same(a: Extent | None, b: Extent | None) -> bool:
    """Whether ``a`` and ``b`` (the extents of two maps at one offset) hold the same
    bytes there; unknown flags, uncomparable or cut extents never do."""
    if a is None or b is None:
        return a is b  # both holes: both read as zeros
    if not (comparable(a) and comparable(b)) or a.flags & ~_IGNORED != b.flags & ~_IGNORED:
        return False
    if a.flags & FIEMAP_EXTENT_ENCODED:  # the very same extent, nothing less
        return (a.logical, a.physical, a.length) == (b.logical, b.physical, b.length)
    return a.physical - a.logical == b.physical - b.logical


def differing(a: list[Extent], b: list[Extent], size: int) -> list[tuple[int, int]]:
    """The byte ranges ``[start, end)`` of ``[0, size)`` where the maps ``a`` and ``b``
    do not map to the same place with the same flags: a superset of where two files
    with these maps (neither written since) can hold different bytes. Sorted, merged."""
    out: list[tuple[int, int]] = []
    i = j = pos = 0
    while pos < size:
        while i < len(a) and a[i].end <= pos:
            i += 1
        while j < len(b) and b[j].end <= pos:
            j += 1
        ea = a[i] if i < len(a) and a[i].logical <= pos else None
        eb = b[j] if j < len(b) and b[j].logical <= pos else None
        nxt = size
        if i < len(a):
            nxt = min(nxt, a[i].end if ea is not None else a[i].logical)
        if j < len(b):
            nxt = min(nxt, b[j].end if eb is not None else b[j].logical)
        if not _same(ea, eb):
            if out and out[-1][1] == pos:
                out[-1] = (out[-1][0], nxt)
            else:
                out.append((pos, nxt))
        pos = nxt
    return out


def block_ranges(byte_ranges: list[tuple[int, int]], block_size: int) -> list[tuple[int, int]]:
    """The blocks ``[first, end)`` that any of ``byte_ranges`` touches, merged."""
    out: list[tuple[int, int]] = []
    for lo, hi in byte_ranges:
        first, end = lo // block_size, -(-hi // block_size)
        if out and out[-1][1] >= first:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((first, end))
    return out
