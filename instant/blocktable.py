"""``BlockTable``: where every block of a served disk is in the vault, kept compact.

A served disk may have millions of blocks and is served for hours, so the table holds
plain arrays, not an object per block: per disk block its pack and its position in
that pack's entries (8 bytes); per stored block its offset, length and id (44 bytes),
with the disk's blocks that hold it (the first inline; any more, for a block stored
once and used at several places of the disk, in a small dict).
"""

from __future__ import annotations

from array import array
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
    def __init__(self, nblocks: int,
                 by_pack: dict[str, list[tuple[int, bytes, Location]]]) -> None:
        """``by_pack``: what ``vault.index.locate_blocks`` returns for the disk's map."""
        self.nblocks = nblocks
        self.pack_ids: list[str] = []
        self._packs: list[_Pack] = []
        self._more: dict[tuple[int, int], tuple[int, ...]] = {}
        self._pack_of = array("i", [-1]) * nblocks
        self._pos = array("I", [0]) * nblocks
        for pack_id, items in by_pack.items():
            pi = len(self.pack_ids)
            self.pack_ids.append(pack_id)
            pk = _Pack()
            self._packs.append(pk)
            holders: dict[int, list[int]] = {}
            for n, bid, loc in sorted(items, key=lambda it: (it[2].offset, it[0])):
                same = holders.get(loc.offset)
                if same is not None:
                    same.append(n)
                    self._pack_of[n], self._pos[n] = pi, len(pk.offs) - 1
                    continue
                holders[loc.offset] = [n]
                self._pack_of[n], self._pos[n] = pi, len(pk.offs)
                pk.offs.append(loc.offset)
                pk.lens.append(loc.length)
                pk.ids += bid
                pk.first.append(n)
            for ns in holders.values():
                if len(ns) > 1:
                    self._more[(pi, self._pos[ns[0]])] = tuple(ns)

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
