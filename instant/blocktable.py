"""``BlockTable``: where every block of a served disk is in the vault, kept compact.

A served disk may have millions of blocks and is served for hours, so the table holds
plain arrays, not an object per block: per disk block its pack and its position in
that pack's entries (8 bytes); per stored block its offset, length and id (44 bytes),
with the disk's blocks that hold it (the first inline; any more, for a block stored
once and used at several places of the disk, in a small dict).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from vault.index import Location

ID = 32


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored block of a pack, and the disk's blocks that hold it."""

    pack: int
    loc: Location
    block_id: bytes
    blocks: tuple[int, ...]


class _Pack:
    __slots__ = ("first", "ids", "lens", "offs")

    def __init__(self) -> None:
        self.offs = array("Q")
        self.lens = array("I")
        self.ids = bytearray()
        self.first = array("q")


class BlockTable:
    """Built a range of the disk at a time: ``add`` each range's located blocks, then
    ``finish``; nothing per block is held beside the table's arrays meanwhile."""

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.stored = 0  # the disk's blocks in the point's map
        self.pack_ids: list[str] = []
        self._number: dict[str, int] = {}  # pack id -> its number, while building
        self._packs: list[_Pack] = []
        self._more: dict[tuple[int, int], tuple[int, ...]] = {}
        self._pack_of = array("i", [-1]) * nblocks
        self._pos = array("I", [0]) * nblocks

    def add(self, items: Iterable[tuple[int, bytes, Location]]) -> None:
        """Blocks of the disk (block number, id, where it is; each block once, in any
        order), as ``vault.index`` lookups give them."""
        for n, bid, loc in items:
            pi = self._number.get(loc.pack_id)
            if pi is None:
                pi = self._number[loc.pack_id] = len(self.pack_ids)
                self.pack_ids.append(loc.pack_id)
                self._packs.append(_Pack())
            pk = self._packs[pi]
            self._pack_of[n] = pi
            pk.offs.append(loc.offset)
            pk.lens.append(loc.length)
            pk.ids += bid
            pk.first.append(n)
            self.stored += 1

    def finish(self) -> None:
        """Put each pack's entries in offset order (what a fetch reads runs of), one entry
        for a block stored once and held at several places of the disk (the blocks of
        one frame: one entry each, at the frame's offset)."""
        for pi, pk in enumerate(self._packs):
            # The blocks of one frame (vault/pack.py) share its offset: a stored block is
            # its offset and its id.
            order = sorted(range(len(pk.offs)), key=lambda i: (
                pk.offs[i], pk.ids[i * ID:(i + 1) * ID], pk.first[i]))
            out = _Pack()
            for i in order:
                n = pk.first[i]
                if (out.offs and out.offs[-1] == pk.offs[i]
                        and out.ids[-ID:] == pk.ids[i * ID:(i + 1) * ID]):  # the same again
                    pos = len(out.offs) - 1
                    self._more[(pi, pos)] = (*self._more.get((pi, pos), (out.first[pos],)), n)
                else:
                    pos = len(out.offs)
                    out.offs.append(pk.offs[i])
                    out.lens.append(pk.lens[i])
                    out.ids += pk.ids[i * ID:(i + 1) * ID]
                    out.first.append(n)
                self._pos[n] = pos
            self._packs[pi] = out
        self._number.clear()

    def in_map(self, n: int) -> bool:
        """Whether block ``n`` is stored (absent: it is zero at the point)."""
        return self._pack_of[n] >= 0

    def locate(self, n: int) -> tuple[int, int]:
        """(pack number, position in its entries) of stored block ``n``; KeyError for a
        block that is not stored."""
        pack = self._pack_of[n]
        if pack < 0:
            raise KeyError(n)
        return pack, self._pos[n]

    def count(self, pack: int) -> int:
        return len(self._packs[pack].offs)

    def entry(self, pack: int, i: int) -> Entry:
        pk = self._packs[pack]
        blocks = self._more.get((pack, i)) or (pk.first[i],)
        return Entry(pack, Location(self.pack_ids[pack], pk.offs[i], pk.lens[i]),
                     bytes(pk.ids[i * ID:(i + 1) * ID]), blocks)

    def end(self, pack: int, i: int) -> int:
        """The pack offset where entry ``i`` ends."""
        pk = self._packs[pack]
        return pk.offs[i] + pk.lens[i]

    def start(self, pack: int, i: int) -> int:
        return self._packs[pack].offs[i]
