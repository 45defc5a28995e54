"""A point's disk map as the maps of its delta chain, read as their plaintexts, not
resolved into a dict: what a resync basis streams from (vault/fpstream.py) and what a
FETCH looks blocks up in (procserver/fetch.py).

A resolved map (``Vault.resolve_map``) is a dict of every non-zero block of the disk, a
few hundred bytes an entry; the chain's ``MapEntries`` are 40 bytes an entry, sorted by
block number. ``MapChain.lookup`` finds the blocks asked for by binary search in each
map, newest first: the first map naming a block gives its id, an all-zero id in a delta
saying it is zero now; a block no map names is zero (the chain ends at a full map).
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Iterable

from vault import names
from vault.errors import IntegrityError, MissingObjectError, NotFoundError
from vault.maps import DELTA, ENTRY, FULL, ZERO_ID, MapEntries, open_map_entries
from vault.point import Point
from vault.repo import MAX_CHAIN, Vault

_NUMBER = struct.Struct("<Q")


async def chain_entries(vault: Vault, point: Point, disk: str,
                        cache: dict[str, MapEntries] | None = None) -> list[MapEntries]:
    """The maps of ``disk`` along ``point``'s delta chain, newest first, the full map
    last; ``KeyError`` if ``point`` has no such disk, ``IntegrityError`` if the chain
    is broken (a base without the disk included) or the kinds do not match. ``cache``
    (map id -> entries) lets the points of one chain share the maps they have in
    common: a map in it is not read again, a map read is put in it."""
    chain: list[MapEntries] = []
    p: Point | None = point
    while p is not None:
        try:
            entry = p.disk(disk)
        except KeyError:
            if p is point:
                raise
            raise IntegrityError(f"points/{point.id}", f"delta chain is broken: base point "
                                 f"{p.id[:16]} has no disk {disk!r}") from None
        m = None if cache is None else cache.get(entry.map)
        if m is None:
            try:
                raw = await vault.store.get(names.MAPS + entry.map)
            except NotFoundError:
                raise MissingObjectError(names.MAPS + entry.map,
                                         "the map is missing") from None
            m = open_map_entries(vault.keyring, entry.map, raw)
            if cache is not None:
                cache[entry.map] = m
        chain.append(m)
        if entry.map_kind == "full":
            break
        if p.base is None or len(chain) > MAX_CHAIN:
            raise IntegrityError(f"points/{point.id}", "delta chain is broken")
        p = await vault.read_point(p.base)
    if chain[-1].kind != FULL or any(m.kind != DELTA for m in chain[:-1]):
        raise IntegrityError(f"points/{point.id}", "map kinds do not match the manifest")
    return chain


class Numbers:
    """The block numbers of a map's entries as a sequence, for ``bisect``."""

    def __init__(self, m: MapEntries) -> None:
        self._body, self._count = m.body, m.count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> int:
        return int(_NUMBER.unpack_from(self._body, i * ENTRY.size)[0])


class MapChain:
    """The maps of one disk along a point's delta chain (``chain_entries``, newest
    first), each checked once to be sorted and within the disk; nothing else is held."""

    def __init__(self, chain: list[MapEntries]) -> None:
        if not chain:
            raise ValueError("a map chain holds at least its full map")
        for m in chain:
            deque(m.iter(), maxlen=0)  # IntegrityError if out of order or past the disk
        self.maps = chain
        self.entries = sum(m.count for m in chain)

    def lookup(self, blocks: Iterable[int]) -> dict[int, bytes]:
        """Block number -> id of the non-zero ones of ``blocks`` at the chain's point
        (what ``Vault.resolve_map``'s dict would give them); the others are zero."""
        todo = sorted(set(blocks))
        found: dict[int, bytes] = {}
        for m in self.maps:
            if not todo:
                break
            numbers, body, lo, rest = Numbers(m), m.body, 0, []
            for n in todo:  # in order: each search starts where the last one ended
                lo = bisect.bisect_left(numbers, n, lo)
                if lo < m.count and numbers[lo] == n:
                    bid = bytes(body[lo * ENTRY.size + 8:(lo + 1) * ENTRY.size])
                    if bid != ZERO_ID:
                        found[n] = bid
                else:
                    rest.append(n)
            todo = rest
        return found
