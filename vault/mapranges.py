"""A point's disk map cut into consecutive ranges of block numbers: what a restore
(vault/materialize.py) reads the disk by, without a dict of the whole disk.

The delta chain's maps are held as their plaintexts (``chain_entries``, 40 bytes an
entry, newest first; vault/mapchain.py). Each map is sorted by block number, so a
range's entries are one slice of it, found by binary search from where the previous
range's slice ended; the range's blocks are the slices applied oldest first (a newer
map's entry wins, an all-zero id in a delta says the block is zero now). Every entry is
checked once, as its range is taken: in order, and within the disk (a dict would have
hidden a map out of order; an entry past the disk is refused at the last range).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from vault.errors import IntegrityError
from vault.mapchain import Numbers
from vault.maps import ENTRY, ZERO_ID, MapEntries

RANGE_BLOCKS = 1 << 16  # blocks a range: 4 GiB of 64 KiB blocks, 2.6 MB of map entries


class ChainRanges:
    """The maps of one disk along a point's delta chain (newest first), read range by
    range in increasing block order: ``blocks(first, end)`` for each consecutive range,
    ``skip(first)`` past ranges an earlier run restored."""

    def __init__(self, chain: list[MapEntries], nblocks: int) -> None:
        if not chain:
            raise ValueError("a map chain holds at least its full map")
        self._maps = chain
        self._nblocks = nblocks
        self._pos = [0] * len(chain)  # each map's first entry not taken yet
        self._next = 0  # the first block of the next range
        self.entries = sum(m.count for m in chain)

    def skip(self, first: int) -> None:
        """Go on from block ``first`` (the entries before it are not read)."""
        if first < self._next:
            raise ValueError(f"ranges go forward: block {first} is before {self._next}")
        for i, m in enumerate(self._maps):
            self._pos[i] = bisect.bisect_left(Numbers(m), first, self._pos[i])
        self._next = first

    def blocks(self, first: int, end: int) -> dict[int, bytes]:
        """Block number -> id of the non-zero blocks of ``[first, end)`` (the blocks that
        ``Vault.resolve_map`` would give); the range starts where the last one ended.
        ``IntegrityError`` naming the map if an entry is out of order or past the disk."""
        if first != self._next or not first < end <= self._nblocks:
            raise ValueError(f"range [{first}, {end}) does not follow block {self._next} "
                             f"within {self._nblocks} blocks")
        out: dict[int, bytes] = {}
        for i in reversed(range(len(self._maps))):  # the full map first, the newest last
            m = self._maps[i]
            lo = self._pos[i]
            # The last range takes every entry left, so one past the disk is seen.
            hi = m.count if end == self._nblocks else bisect.bisect_left(Numbers(m), end, lo)
            last = first - 1
            for n, bid in ENTRY.iter_unpack(m.body[lo * ENTRY.size:hi * ENTRY.size]):
                if not last < n < end:
                    raise IntegrityError(m.what, f"block {n} lies beyond the disk's "
                                         f"{self._nblocks} blocks or out of order")
                last = n
                if bid == ZERO_ID:
                    out.pop(n, None)
                else:
                    out[n] = bid
            self._pos[i] = hi
        self._next = end
        return out

    def walk(self, span: int = RANGE_BLOCKS) -> Iterator[tuple[int, int, dict[int, bytes]]]:
        """``(first, end, blocks(first, end))`` for each range of ``span`` blocks from
        where the last range ended to the end of the disk."""
        if span < 1:
            raise ValueError(f"a range is at least one block, not {span}")
        for first in range(self._next, self._nblocks, span):
            end = min(first + span, self._nblocks)
            yield first, end, self.blocks(first, end)
