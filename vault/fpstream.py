"""A point's fingerprints streamed per range of blocks: what a resync basis sends.

``vault/fpmap.py`` computes a disk's whole fingerprint map at once (16 bytes a block,
plus the resolved map as a dict: a few hundred bytes a mapped block). Here the delta
chain's maps are gone through a range at a time (``vault/mapranges.py``: a format 1 map
held as its plaintext, 40 bytes an entry, a format 2 map a chunk or two of it at a
time; no dict of the disk); the disk is read back ``span`` blocks at a time: the range's
block ids looked up in one batch, its packs read in runs of nearby blocks, its fingerprints
computed and handed on. What is held grows with ``span``, not with the disk (besides
a format 1 map's plaintext).

The fingerprints are checked against the digest recorded with the point, as a whole
map is: each range is held back until the next is computed, and the last one is handed
on only once the digest matched, so a reader that got every range got a verified map
(``IntegrityError`` instead of the last range otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor

from common.digest import DiskDigest, block_count, fingerprint
from vault import names
from vault.errors import IntegrityError, UnindexedBlocksError
from vault.index import BlockIndex, Location
from vault.mapchain import chain_entries
from vault.mapranges import ChainRanges
from vault.packrange import open_span, read_span
from vault.point import Point
from vault.repo import Vault

FP = 16  # bytes a fingerprint
DEFAULT_SPAN = 1 << 16  # blocks a range: 1 MiB of fingerprints, one MAP frame
GAP = 1 << 20  # bytes of a pack read through between two wanted blocks, not read apart
PACK_READS = 4  # pack reads at once


def _runs(items: list[tuple[int, bytes, Location]]
          ) -> Iterator[list[tuple[int, bytes, Location]]]:
    """``items`` of one pack in offset order, cut where more than ``GAP`` bytes lie
    between two: each run is one read."""
    items = sorted(items, key=lambda i: i[2].offset)
    run: list[tuple[int, bytes, Location]] = []
    hi = 0
    for item in items:
        loc = item[2]
        if run and loc.offset - hi > GAP:
            yield run
            run = []
        hi = max(hi, loc.offset + loc.length) if run else loc.offset + loc.length
        run.append(item)
    if run:
        yield run


def span_fingerprints(vault: Vault, pack_id: str, items: list[tuple[int, bytes, Location]],
                      raw: bytes, base: int) -> list[tuple[int, bytes]]:
    """The fingerprint of each block of ``items`` opened from ``raw`` (``open_span``)."""
    return [(n, fingerprint(data))
            for n, data in open_span(vault.keyring, pack_id, items, raw, base)]


async def fingerprint_ranges(vault: Vault, point: Point, disk: str, *, index: BlockIndex,
                             executor: Executor | None = None, span: int = DEFAULT_SPAN
                             ) -> AsyncIterator[tuple[int, bytes]]:
    """``(first block, fingerprints)`` of each range of ``span`` blocks of ``disk`` in
    ``point``, in block order, covering the disk; the last one only once the whole map
    matched the point's digest (see the module's docstring). ``UnindexedBlocksError``
    if a block is in no index, ``IntegrityError`` for anything damaged or missing."""
    if span < 1:
        raise ValueError(f"a range is at least one block, not {span}")
    entry = point.disk(disk)
    size, bs = entry.size, entry.block_size
    nblocks = block_count(size, bs)
    ranges = ChainRanges(await chain_entries(vault, point, disk), nblocks)
    loop = asyncio.get_running_loop()
    zero, short = fingerprint(bytes(bs)), fingerprint(bytes(size - (nblocks - 1) * bs))
    digest = DiskDigest()
    held: tuple[int, bytes] | None = None
    sem = asyncio.Semaphore(PACK_READS)

    def locate(first: int, end: int
               ) -> tuple[dict[str, list[tuple[int, bytes, Location]]], list[int]]:
        items = ranges.blocks(first, end).items()
        found = index.lookup({bid for _n, bid in items})
        by_pack: dict[str, list[tuple[int, bytes, Location]]] = {}
        missing: list[int] = []
        for n, bid in items:
            loc = found.get(bid)
            if loc is None:
                missing.append(n)
            else:
                by_pack.setdefault(loc.pack_id, []).append((n, bid, loc))
        return by_pack, missing

    for first in range(0, nblocks, span):
        end = min(nblocks, first + span)
        out = bytearray(zero * (end - first))
        if end == nblocks and short != zero:
            out[FP * (end - 1 - first):] = short  # the last block is short
        await ranges.load(end)
        by_pack, missing = await loop.run_in_executor(executor, locate, first, end)
        if missing:
            raise UnindexedBlocksError(names.POINTS + point.id, disk, len(missing),
                                       min(missing))

        async def read(pack_id: str, run: list[tuple[int, bytes, Location]],
                       out: bytearray = out, first: int = first) -> None:
            async with sem:
                raw, lo = await read_span(vault.store, pack_id, run)
                got = await loop.run_in_executor(executor, span_fingerprints, vault, pack_id,
                                                 run, raw, lo)
                for n, fp in got:
                    out[FP * (n - first):FP * (n - first + 1)] = fp

        await asyncio.gather(*(read(pack_id, run) for pack_id, items in by_pack.items()
                               for run in _runs(items)))
        digest.update(bytes(out))
        if held is not None:
            yield held
        held = (first, bytes(out))
    if entry.digest and digest.hexdigest() != entry.digest:
        raise IntegrityError(f"points/{point.id}", f"disk {disk!r} read back from the vault "
                             "does not match the digest recorded with the point")
    if held is not None:
        yield held
