"""The block-map changes of one disk in a cycle being written, within a memory budget.

``CycleWriter`` keeps every block a cycle records (its number and id) until the point's
map is written. A dict of them costs about 140 bytes a block (an int key, a 32-byte
bytes object, the table's slot): 4.7 GB for the initial copy of a 2 TiB disk of 64 KiB
blocks. Here they are appended to two flat arrays (``u64`` block numbers, 32-byte ids:
40 bytes a block), and past ``limit`` entries the arrays are sorted and written to a
*run*, a nameless file in ``spill_dir`` (``common/scratch.py``: gone with the
process, even after a ``kill -9``), so what a cycle holds in memory does not grow with
its disk. Reading the changes back merges the runs and what is in memory, in block
order.

Blocks come in increasing order: an agent sends a disk's blocks in order, a resumed
cycle goes on after its position, a replay reads the journal in the order it was
written. Then the runs follow one another and reading them is a concatenation.
Anything else (a block recorded again, one before the last) is sorted out when the
changes are read, the last id recorded for a block kept, as a dict would.
"""

from __future__ import annotations

import heapq
import os
import weakref
from array import array
from collections.abc import Iterator

from common.scratch import scratch_file, write_all

ID = 32  # bytes of a block id
SPILL_ENTRIES = 1 << 18  # entries held in memory before a run is written: 10 MiB
_READ_ENTRIES = 4096  # entries read from a run at once


class _Run:
    """A sorted run of distinct blocks in an unlinked file: the ``u64`` numbers, then the
    ids. Its descriptor is closed by ``close``, or when the run is collected."""

    __slots__ = ("__weakref__", "_closer", "count", "fd")

    def __init__(self, fd: int, count: int) -> None:
        self.fd, self.count = fd, count
        self._closer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        self._closer()

    def items(self) -> Iterator[tuple[int, bytes]]:
        fd = self.fd
        for lo in range(0, self.count, _READ_ENTRIES):
            k = min(_READ_ENTRIES, self.count - lo)
            nums = array("Q")
            nums.frombytes(os.pread(fd, 8 * k, 8 * lo))
            ids = os.pread(fd, ID * k, 8 * self.count + ID * lo)
            if len(nums) != k or len(ids) != ID * k:
                raise OSError(f"a run of block changes was cut short at entry {lo}")
            for i, n in enumerate(nums):
                yield n, ids[i * ID:(i + 1) * ID]


def _tagged(k: int, src: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, int, bytes]]:
    for n, bid in src:
        yield n, k, bid


class BlockChanges:
    """``block number -> id`` for one disk, appended, read back in block order."""

    __slots__ = ("_ids", "_last", "_limit", "_nums", "_ordered", "_runs", "_sorted",
                 "_spill_dir")

    def __init__(self, *, limit: int = SPILL_ENTRIES,
                 spill_dir: str | os.PathLike[str] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"a run holds at least one entry, not {limit}")
        self._limit, self._spill_dir = limit, spill_dir
        self._nums = array("Q")
        self._ids = bytearray()
        self._runs: list[_Run] = []
        self._last = -1  # the highest block number recorded
        self._sorted = True  # in memory, every block after the one before it
        self._ordered = True  # the same of every entry, the runs' too

    def set(self, n: int, block_id: bytes) -> None:
        """Record block ``n``'s id (a later one for the same block wins)."""
        if len(block_id) != ID:
            raise ValueError(f"a block id is {ID} bytes, not {len(block_id)}")
        nums = self._nums
        if n > self._last:  # the common case: after every block recorded before
            self._last = n
        else:
            self._ordered = False
            if nums and n <= nums[-1]:  # (while sorted, the last in memory is its highest)
                self._sorted = False
        nums.append(n)
        self._ids += block_id
        if len(nums) >= self._limit:
            self._spill()

    @property
    def runs(self) -> int:
        """How many runs were written to files (for tests and reports)."""
        return len(self._runs)

    def __len__(self) -> int:
        """How many distinct blocks."""
        if self._ordered:
            return len(self._nums) + sum(r.count for r in self._runs)
        return sum(1 for _ in self.items())

    def items(self) -> Iterator[tuple[int, bytes]]:
        """``(block number, id)`` in increasing block order, each block once."""
        self._settle()
        if not self._runs:
            return self._memory()
        if self._ordered:  # each run after the one before: one after another
            return self._chained()
        return self._merged()

    def ids(self) -> Iterator[bytes]:
        """The ids, in block order."""
        return (bid for _n, bid in self.items())

    def close(self) -> None:
        """Drop every change held, the runs' files with them (closing an unlinked file
        frees its space); what is left is empty."""
        for r in self._runs:
            r.close()
        self._runs.clear()
        self._nums, self._ids = array("Q"), bytearray()
        self._last = -1
        self._sorted = self._ordered = True

    def _memory(self) -> Iterator[tuple[int, bytes]]:
        ids = self._ids
        for i, n in enumerate(self._nums):
            yield n, bytes(ids[i * ID:(i + 1) * ID])

    def _chained(self) -> Iterator[tuple[int, bytes]]:
        for r in self._runs:
            yield from r.items()
        yield from self._memory()

    def _merged(self) -> Iterator[tuple[int, bytes]]:
        # Each source is sorted and has each block once; of one block's entries, the
        # one of the latest source (memory is the latest) wins.
        sources = [*(r.items() for r in self._runs), self._memory()]
        tagged = [_tagged(k, src) for k, src in enumerate(sources)]
        pending: tuple[int, int, bytes] | None = None
        for entry in heapq.merge(*tagged):
            if pending is not None and pending[0] != entry[0]:
                yield pending[0], pending[2]
            pending = entry
        if pending is not None:
            yield pending[0], pending[2]

    def _spill(self) -> None:
        self._settle()
        fd = scratch_file(self._spill_dir)
        try:
            write_all(fd, memoryview(self._nums).cast("B"))
            write_all(fd, self._ids)
        except BaseException:
            os.close(fd)
            raise
        self._runs.append(_Run(fd, len(self._nums)))
        self._nums, self._ids = array("Q"), bytearray()

    def _settle(self) -> None:
        """Put the entries in memory in block order, the last one recorded of each block
        kept."""
        if self._sorted:
            return
        nums, ids = self._nums, self._ids
        # Stable: of the entries of one block, the last recorded comes last.
        order = sorted(range(len(nums)), key=nums.__getitem__)
        out_nums, out_ids = array("Q"), bytearray()
        for k, i in enumerate(order):
            if k + 1 < len(order) and nums[order[k + 1]] == nums[i]:
                continue  # recorded again later
            out_nums.append(nums[i])
            out_ids += ids[i * ID:(i + 1) * ID]
        self._nums, self._ids, self._sorted = out_nums, out_ids, True
