"""A point's disk map cut into consecutive ranges of block numbers: what a restore
(vault/materialize.py) reads the disk by, without a dict of the whole disk.

The delta chain's maps (``chain_entries``, newest first; vault/mapchain.py) are read a
chunk at a time: a format 1 map is one chunk, its whole plaintext (40 bytes an entry); a
format 2 map's chunks are read as the ranges reach them (vault/mapchunks.py). Each map
is sorted by block number, so a range's entries are one slice of it (of a chunk or
two), found by binary search from where the previous range's slice ended; the range's
blocks are the slices applied oldest first (a newer map's entry wins, an all-zero id in
a delta says the block is zero now). Every entry is checked once, as its range is taken:
in order, and within the disk (a dict would have hidden a map out of order; an entry
past the disk is refused at the last range).
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Sequence

from vault.errors import IntegrityError
from vault.mapchain import Numbers
from vault.maps import ENTRY, ZERO_ID, MapView

RANGE_BLOCKS = 1 << 16  # blocks a range: 4 GiB of 64 KiB blocks, 2.6 MB of map entries


class _Cursor:
    """Where a map's next entry not taken yet is: chunk ``ci``, entry ``pos`` of it; the
    chunks the range being taken needs (``held``)."""

    __slots__ = ("ci", "held", "m", "pos")

    def __init__(self, m: MapView) -> None:
        self.m, self.ci, self.pos = m, 0, 0
        self.held: dict[int, memoryview] = {}


class ChainRanges:
    """The maps of one disk along a point's delta chain (newest first), read range by
    range in increasing block order: ``await load(end)`` then ``blocks(first, end)`` for
    each consecutive range (``walk`` does both), ``await skip(first)`` past ranges an
    earlier run restored. Only the chunks of a map the range needs are held (a format 1
    map is one chunk: the whole of it)."""

    def __init__(self, chain: Sequence[MapView], nblocks: int) -> None:
        if not chain:
            raise ValueError("a map chain holds at least its full map")
        self._cursors = [_Cursor(m) for m in chain]
        self._nblocks = nblocks
        self._next = 0  # the first block of the next range
        self.entries = sum(m.count for m in chain)

    async def skip(self, first: int) -> None:
        """Go on from block ``first`` (the entries before it are not read)."""
        if first < self._next:
            raise ValueError(f"ranges go forward: block {first} is before {self._next}")
        for c in self._cursors:
            firsts = c.m.firsts
            while c.ci + 1 < len(firsts) and firsts[c.ci + 1] <= first:
                c.ci, c.pos = c.ci + 1, 0
            if c.ci < len(firsts):
                body = await c.m.chunk(c.ci)
                c.pos = bisect.bisect_left(Numbers(body), first, c.pos)
            c.held = {}
        self._next = first

    async def load(self, end: int) -> None:
        """Read the chunks ``blocks(next first, end)`` needs (none, for format 1 maps) and
        let go of the ones before them."""
        for c in self._cursors:
            firsts = c.m.firsts
            held = {i: v for i, v in c.held.items() if i >= c.ci}
            i = c.ci
            while i < len(firsts) and (end >= self._nblocks or firsts[i] < end):
                if i not in held:
                    held[i] = await c.m.chunk(i)
                i += 1
            c.held = held

    def blocks(self, first: int, end: int) -> dict[int, bytes]:
        """Block number -> id of the non-zero blocks of ``[first, end)`` (the blocks that
        ``Vault.resolve_map`` would give); the range starts where the last one ended and
        ``load(end)`` came before. ``IntegrityError`` naming the map if an entry is out
        of order or past the disk."""
        if first != self._next or not first < end <= self._nblocks:
            raise ValueError(f"range [{first}, {end}) does not follow block {self._next} "
                             f"within {self._nblocks} blocks")
        out: dict[int, bytes] = {}
        # The last range takes every entry left, so one past the disk is seen.
        to_end = end == self._nblocks
        for c in reversed(self._cursors):  # the full map first, the newest last
            firsts, last = c.m.firsts, first - 1
            while c.ci < len(firsts) and (to_end or firsts[c.ci] < end):
                body = c.held.get(c.ci)
                if body is None:
                    raise RuntimeError(f"blocks({first}, {end}): load({end}) first")
                count = len(body) // ENTRY.size
                hi = count if to_end else bisect.bisect_left(Numbers(body), end, c.pos)
                for n, bid in ENTRY.iter_unpack(body[c.pos * ENTRY.size:hi * ENTRY.size]):
                    if not last < n < end:
                        raise IntegrityError(c.m.what, f"block {n} lies beyond the disk's "
                                             f"{self._nblocks} blocks or out of order")
                    last = n
                    if bid == ZERO_ID:
                        out.pop(n, None)
                    else:
                        out[n] = bid
                if hi < count:
                    c.pos = hi
                    break
                c.ci, c.pos = c.ci + 1, 0
        self._next = end
        return out

    async def walk(self, span: int = RANGE_BLOCKS
                   ) -> AsyncIterator[tuple[int, int, dict[int, bytes]]]:
        """``(first, end, blocks(first, end))`` for each range of ``span`` blocks from
        where the last range ended to the end of the disk."""
        if span < 1:
            raise ValueError(f"a range is at least one block, not {span}")
        for first in range(self._next, self._nblocks, span):
            end = min(first + span, self._nblocks)
            await self.load(end)
            yield first, end, self.blocks(first, end)
