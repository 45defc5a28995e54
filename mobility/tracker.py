"""The persisted per-block fingerprint map, and the full scan that computes it.

A full scan hashes every block (xxh3-128; holes of sparse files are not read) and
sends the blocks whose fingerprint changed; with a change tracker (``changes.py``)
only the blocks it names are read and hashed, the others keep the base's
fingerprints (``work``). New maps are written under the new
cycle's name and become the agent's state only when ``state.json`` is replaced
after the process server acknowledged the cycle: a crash at any moment leaves
either the old state or the new one.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.digest import block_count, fingerprint, is_zero, zero_fingerprint
from common.fs import atomic_write

CHUNK = 4 << 20
#: a disk's previous fingerprints: the agent's own map, or a resync basis's, memory-mapped
#: (mobility/cycleplan.py)
OldMap = bytes | mmap.mmap


@dataclass
class DiskState:
    size: int
    block_size: int
    map_file: str
    # When a cycle last read every block of the disk (a full copy, a scan, a verification
    # scan of a tracked disk; seconds since the epoch; 0: not since this field exists),
    # and how many changed blocks the tracker had missed then (verification scans only).
    verified_at: float = 0.0
    missed_blocks: int = 0


@dataclass
class AgentState:
    last_cycle: str
    disks: dict[str, DiskState]


def load_state(state_dir: Path) -> AgentState | None:
    try:
        doc = json.loads((state_dir / "state.json").read_text())
        return AgentState(doc["last_cycle"],
                          {k: DiskState(**v) for k, v in doc["disks"].items()})
    except FileNotFoundError:
        return None


def load_map(state_dir: Path, ds: DiskState) -> OldMap | None:
    """The disk's map, memory-mapped read-only (page cache, not the agent's memory);
    None if it is missing or not of the disk's size. A map file never changes once
    written (``write_map`` replaces a file whole), so the mapping stays valid."""
    want = 16 * block_count(ds.size, ds.block_size)
    try:
        with open(state_dir / ds.map_file, "rb") as f:
            if os.fstat(f.fileno()).st_size != want:
                return None
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if want else b""
    except FileNotFoundError:
        return None


def write_map(state_dir: Path, name: str, fps: bytes | bytearray | memoryview) -> None:
    """Write a map file whole from ``fps`` itself (not a copy): a new file renamed over
    any of that name (one that is memory-mapped keeps its old content)."""
    atomic_write(state_dir / name, fps)


def commit_state(state_dir: Path, state: AgentState) -> None:
    """Atomically make ``state`` current, then delete maps no longer referenced."""
    doc = {"last_cycle": state.last_cycle,
           "disks": {k: v.__dict__ for k, v in state.disks.items()}}
    atomic_write(state_dir / "state.json", json.dumps(doc))
    keep = {d.map_file for d in state.disks.values()}
    for p in state_dir.glob("*.fp"):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def disk_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The byte ranges that hold data (SEEK_DATA/SEEK_HOLE); the whole disk if unsupported.

    Only regular files (image files) have holes: on a block device Linux answers
    SEEK_DATA with ENXIO, which would read as "no data at all".
    """
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return [(0, size)]
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(end, size)))
            pos = end
    except OSError:
        return [(0, size)]
    return out


#: a changed block: its number, and its bytes (a view of the chunk read) or None: zero
Change = tuple[int, memoryview | None]


def scan_chunk(
    fd: int, size: int, bs: int, first: int, count: int, old: OldMap | None,
    extents: list[tuple[int, int]], new_fps: bytearray | mmap.mmap, full: bool,
) -> tuple[list[Change], int]:
    """Fingerprint blocks ``first .. first+count-1``; return the changed ones and how
    many bytes were read.

    ``(n, data)`` for a changed data block, ``(n, None)`` for a block that became zero.
    ``data`` is a view of the chunk read, not a copy: the caller's frames join it once.
    """
    start, end = first * bs, min(size, (first + count) * bs)
    has_data = any(s < end and e > start for s, e in extents)
    buf = os.pread(fd, end - start, start) if has_data else b""
    view = memoryview(buf)
    changes: list[Change] = []
    for i in range(count):
        n = first + i
        lo = i * bs
        ln = min(bs, size - n * bs)
        blk = view[lo:lo + ln] if has_data else None
        zero = blk is None or is_zero(blk)
        fp = zero_fingerprint(ln) if blk is None or zero else fingerprint(blk)
        new_fps[16 * n:16 * n + 16] = fp
        if full:
            if not zero:
                changes.append((n, blk))
        elif old is None or old[16 * n:16 * n + 16] != fp:
            changes.append((n, None if zero else blk))
    return changes, len(buf)


Piece = tuple[int, int]  # blocks first .. first+count-1


def work(size: int, bs: int, ranges: Sequence[tuple[int, int]] | None, start: int
         ) -> list[list[Piece]]:
    """The blocks to read from block ``start`` on, grouped by ``CHUNK``-aligned chunk:
    each item the pieces of one chunk, read by one task. ``ranges`` (``[first, end)``
    block ranges, sorted) limits the reads to what a tracker named; None: every block.
    """
    nblocks = block_count(size, bs)
    per = max(1, CHUNK // bs)
    items: list[list[Piece]] = []
    for lo, hi in ranges if ranges is not None else ((0, nblocks),):
        lo, hi = max(lo, start), min(hi, nblocks)
        while lo < hi:
            end = min(hi, (lo // per + 1) * per)
            if items and items[-1][-1][0] // per == lo // per:
                items[-1].append((lo, end - lo))
            else:
                items.append([(lo, end - lo)])
            lo = end
    return items
