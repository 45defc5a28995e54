"""What a failback found to write on each disk, kept on disk (a bit a block, never a
list in memory) until the failback ends, so that one run again after an interruption
(a kill -9 of the agent, a disk that failed, a lost connection) reports what the whole
failback wrote.

A failback run again compares every block again and writes only the blocks that still
differ from the point (``mobility/inplace.py``): the blocks an interrupted run wrote
already hold the point and are not written twice. Each run notes the blocks that differ
now, range by range as it compares, in ``failback-todo.DISK`` (``Bits``), and writes
them by reading that file back a stretch at a time. The first run that compares a disk
whole keeps its bitmap as ``failback-plan.DISK``: the point's id on its first line, then
a bitmap of the disk's blocks (bit ``n % 8`` of byte ``n // 8`` set: block ``n``
differed). A later run of the same point finds it: the blocks of the plan that no longer
differ were written by an earlier run. A plan of another point is replaced. The files
are removed with the failback's pending mark once the agent's state is the point.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from common.fs import fsync_dir

PLAN = "failback-plan."  # + the disk's name, in the state directory
TODO = "failback-todo."  # + the disk's name: this run's blocks that differ
STRETCH = 1 << 16  # bytes of a bitmap read at a time (2^19 blocks)


class Bits:
    """A disk's bitmap written in block order (``add``), appended to a file a byte at a
    time as it fills: memory of one byte, however large the disk."""

    def __init__(self, path: Path, point: str, n: int) -> None:
        self.path, self.n = path, n
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._f.write(point.encode() + b"\n")
        self._byte = 0
        self._next = 0  # the first block not noted yet
        self.count = 0  # blocks set
        self.last = False  # the disk's last block is set

    def add(self, differ: list[int], upto: int) -> None:
        """Blocks ``self._next``..``upto``-1 are noted, of them ``differ`` (sorted) set."""
        out = bytearray()
        it = iter(differ)
        nxt = next(it, None)
        for b in range(self._next, upto):
            if b == nxt:
                self._byte |= 1 << (b & 7)
                self.count += 1
                self.last = b == self.n - 1
                nxt = next(it, None)
            if b & 7 == 7:
                out.append(self._byte)
                self._byte = 0
        self._next = upto
        self._f.write(out)

    def close(self) -> None:
        """The bitmap whole (the last byte flushed), durably on disk."""
        if self._next != self.n:
            raise ValueError(f"{self._next} of {self.n} blocks noted")
        if self.n & 7:
            self._f.write(bytes([self._byte]))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abandon(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


def _valid(path: Path, point: str, n: int) -> int | None:
    """The offset of ``path``'s bitmap if it is a whole plan of ``point`` for ``n``
    blocks, else None."""
    head = point.encode() + b"\n"
    try:
        with open(path, "rb") as f:
            if f.read(len(head)) != head:
                return None
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
    return len(head) if size == len(head) + -(-n // 8) else None


def _stretches(path: Path, offset: int, n: int) -> Iterator[tuple[int, bytes]]:
    """``(first block, bitmap bytes)`` of ``path`` from ``offset``, ``STRETCH`` at a time."""
    with open(path, "rb") as f:
        f.seek(offset)
        first = 0
        while first < n:
            part = f.read(STRETCH)
            if not part:
                raise ValueError(f"{path} is shorter than its {n} blocks")
            yield first, part
            first += 8 * len(part)


def blocks(bits: Bits) -> Iterator[int]:
    """The blocks set in a closed bitmap, in order, read from its file a stretch at a
    time."""
    offset = _valid(bits.path, _point_of(bits.path), bits.n)
    if offset is None:
        raise ValueError(f"{bits.path} is not a whole bitmap")
    for first, part in _stretches(bits.path, offset, bits.n):
        for i, byte in enumerate(part):
            if byte:
                for j in range(8):
                    if byte >> j & 1:
                        yield first + 8 * i + j


def _point_of(path: Path) -> str:
    with open(path, "rb") as f:
        return f.readline().rstrip(b"\n").decode(errors="replace")


def todo(state_dir: Path, disk: str, point: str, n: int) -> Bits:
    """This run's bitmap of ``disk`` (``n`` blocks), to note while comparing."""
    return Bits(state_dir / f"{TODO}{disk}", point, n)


def written_before(state_dir: Path, disk: str, point: str, bits: Bits) -> tuple[int, bool]:
    """How many blocks of ``disk`` an interrupted earlier run of this failback of
    ``point`` wrote: those its plan says differed that are not set in ``bits`` (what
    differs now, closed), and whether the disk's last (maybe short) block is one of
    them. The first run keeps ``bits`` as the plan and gets ``(0, False)``."""
    path = state_dir / f"{PLAN}{disk}"
    n = bits.n
    offset = _valid(path, point, n)
    if offset is None:
        os.replace(bits.path, path)  # the bitmap is the plan; it is read from there
        bits.path = path
        fsync_dir(state_dir)
        return 0, False
    count = 0
    last = False
    now = _stretches(bits.path, len(point.encode()) + 1, n)
    for (first, plan), (_first, cur) in zip(_stretches(path, offset, n), now, strict=True):
        gone = int.from_bytes(plan, "little") & ~int.from_bytes(cur, "little")
        count += gone.bit_count()
        if gone and first + 8 * len(plan) >= n and gone >> ((n - 1) - first) & 1:
            last = True
    return count, last


def clear(state_dir: Path) -> None:
    """The failback ended (the agent's state is the point): its plans go."""
    for pat in (f"{PLAN}*", f"{TODO}*"):
        for p in state_dir.glob(pat):
            p.unlink(missing_ok=True)
