"""Short freezes: a cycle's reads copied into a bounded spool while the disks are held.

With ``snapshot = "fsfreeze"`` (or ``script`` around it) the filesystems stay frozen
for as long as the cycle reads its disks. When the trackers know what changed, the
blocks the cycle will read are few: ``fill`` copies them, while the hold lasts, into
a spool in memory (one ``memfd`` per disk, sparse, each block at its own offset), so
that the sender reads exactly what it would have read from the disk — and the hold
can let writes go on (``Held.thaw``) before the first byte is sent. A resumed
connection reads the spool again, never the live disk.

The spool is bounded by ``freeze_spool_mb``: a cycle that would read more (a full
copy, a tracker's rescan, a verification scan, a burst of writes) is read from the
frozen disks as before, and says so (``freeze_spool_overflow``, counted in the agent's
metrics). 0 turns spooling off.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from mobility.sender import CycleDisk
from mobility.tracker import CHUNK, data_extents, work


@dataclass(frozen=True)
class Spooled:
    """What ``fill`` did: the bytes it copied, or (``fits`` False) what the cycle would
    read, larger than the spool."""

    fits: bool
    nbytes: int


def _pieces(d: CycleDisk, bs: int, extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The byte ranges the sender will read of ``d`` (as ``scan_chunk`` does: a piece is
    read whole when any of it holds data)."""
    out: list[tuple[int, int]] = []
    for item in work(d.size, bs, d.ranges, 0):
        for first, count in item:
            lo, hi = first * bs, min(d.size, (first + count) * bs)
            if any(s < hi and e > lo for s, e in extents):
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
    return out


def _copy(src: int, dst: int, pieces: list[tuple[int, int]]) -> int:
    n = 0
    for lo, hi in pieces:
        pos = lo
        while pos < hi:
            buf = os.pread(src, min(CHUNK, hi - pos), pos)
            if not buf:
                raise OSError(f"short read at byte {pos}: the disk shrank during the cycle")
            view = memoryview(buf)
            while view:
                done = os.pwrite(dst, view, pos)
                view, pos = view[done:], pos + done
            n += len(buf)
    return n


def fill(disks: Sequence[CycleDisk], bs: int, limit: int) -> Spooled:
    """Copy what the sender will read of ``disks`` (opened, trackers asked) into memory,
    if it is at most ``limit`` bytes, and point each disk at its copy (the disk's own
    descriptor is closed). Blocking: run it on a thread while the hold lasts."""
    plans = []
    for d in disks:
        extents = d.extents if d.extents is not None else data_extents(d.fd, d.size)
        plans.append((d, extents, _pieces(d, bs, extents)))
    need = sum(hi - lo for _, _, pieces in plans for lo, hi in pieces)
    if need > limit:
        return Spooled(False, need)
    made: list[int] = []
    try:
        for d, _extents, pieces in plans:
            fd = os.memfd_create(f"siterecovery-spool-{d.name}", os.MFD_CLOEXEC)
            made.append(fd)
            os.ftruncate(fd, d.size)
            _copy(d.fd, fd, pieces)
    except BaseException:
        for fd in made:
            os.close(fd)
        raise
    for (d, extents, _), fd in zip(plans, made, strict=True):
        os.close(d.fd)
        d.fd, d.extents = fd, extents
    return Spooled(True, need)
