"""A point's disk map as the maps of its delta chain, not resolved into a dict: what
every range reader goes through (vault/mapranges.py) and what a FETCH looks blocks up in
(procserver/fetch.py).

A resolved map (``Vault.resolve_map``) is a dict of every non-zero block of the disk, a
few hundred bytes an entry; a chain's maps (``MapView``) are read as chunks of sorted
40-byte entries: a format 1 map is one chunk, its whole plaintext; a format 2 map's
chunks are read when asked for (vault/mapchunks.py). ``MapChain.lookup`` finds the
blocks asked for by binary search in each map, newest first: the first map naming a
block gives its id, an all-zero id in a delta saying it is zero now; a block no map
names is zero (the chain ends at a full map).
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Iterable

from vault import names
from vault.errors import IntegrityError, MissingObjectError, NotFoundError
from vault.mapchunks import open_chunked
from vault.maps import DELTA, ENTRY, FULL, ZERO_ID, MapEntries, MapView, open_map_entries
from vault.point import CHUNKED_FORMAT, Point
from vault.repo import MAX_CHAIN, Vault

_NUMBER = struct.Struct("<Q")


async def open_disk_map(vault: Vault, point: Point, map_id: str) -> MapView:
    """Map ``map_id`` of ``point`` as its format says: a format 1 map read whole, a
    format 2 map by its table (its chunks read later); ``MissingObjectError`` if it is
    not in the store, ``IntegrityError`` if damaged."""
    if point.format >= CHUNKED_FORMAT:
        return await open_chunked(vault.store, vault.keyring, map_id)
    try:
        raw = await vault.store.get(names.MAPS + map_id)
    except NotFoundError:
        raise MissingObjectError(names.MAPS + map_id, "the map is missing") from None
    return open_map_entries(vault.keyring, map_id, raw)


async def chain_entries(vault: Vault, point: Point, disk: str,
                        cache: dict[str, MapView] | None = None) -> list[MapView]:
    """The maps of ``disk`` along ``point``'s delta chain, newest first, the full map
    last; ``KeyError`` if ``point`` has no such disk, ``IntegrityError`` if the chain
    is broken (a base without the disk included) or the kinds do not match. ``cache``
    (map id -> entries) lets the points of one chain share the maps they have in
    common: a map in it is not read again, a map read is put in it."""
    chain: list[MapView] = []
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
            m = await open_disk_map(vault, p, entry.map)
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
    """The block numbers of a run of map entries as a sequence, for ``bisect``."""

    def __init__(self, body: memoryview) -> None:
        self._body, self._count = body, len(body) // ENTRY.size

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> int:
        return int(_NUMBER.unpack_from(self._body, i * ENTRY.size)[0])


class MapChain:
    """The maps of one disk along a point's delta chain (``chain_entries``, newest
    first), format 1 maps each checked once to be sorted and within the disk (a format 2
    map's chunks are checked as they are read); nothing else is held."""

    def __init__(self, chain: list[MapView]) -> None:
        if not chain:
            raise ValueError("a map chain holds at least its full map")
        for m in chain:
            if isinstance(m, MapEntries):
                deque(m.iter(), maxlen=0)  # IntegrityError if out of order or past the disk
        self.maps = chain
        self.entries = sum(m.count for m in chain)

    async def lookup(self, blocks: Iterable[int]) -> dict[int, bytes]:
        """Block number -> id of the non-zero ones of ``blocks`` at the chain's point
        (what ``Vault.resolve_map``'s dict would give them); the others are zero. Reads
        the chunks of a format 2 map that hold the blocks asked for."""
        todo = sorted(set(blocks))
        found: dict[int, bytes] = {}
        for m in self.maps:
            if not todo:
                break
            rest: list[int] = []
            firsts = m.firsts
            ci, body, numbers, lo = -1, memoryview(b""), Numbers(memoryview(b"")), 0
            for n in todo:  # in order: each search starts where the last one ended
                want = bisect.bisect_right(firsts, n) - 1
                if want < 0:
                    rest.append(n)
                    continue
                if want != ci:
                    ci, body, lo = want, await m.chunk(want), 0
                    numbers = Numbers(body)
                lo = bisect.bisect_left(numbers, n, lo)
                if lo < len(numbers) and numbers[lo] == n:
                    bid = bytes(body[lo * ENTRY.size + 8:(lo + 1) * ENTRY.size])
                    if bid != ZERO_ID:
                        found[n] = bid
                else:
                    rest.append(n)
            todo = rest
        return found
