"""Prune's garbage collection within a memory budget (``prune(memory=...)``).

The in-memory collection (vault/prune.py) holds a set of every live block id and the
whole index, about 500 bytes a block. This one holds neither:

- *mark*: the live block ids go into a ``SortedSet`` (vault/extsort.py), which spills
  sorted runs to a temporary directory past its share of the budget;
- the index is a ``DiskIndex`` (vault/indexdb.py) in the given index directory (kept
  there, and brought up to date in place at the end, so the next prune or restore
  need not build it again) or in a temporary one;
- *sweep*: the index's entries in block-id order (its table's own order) are merged
  with the sorted live ids, which gives every pack its live and total bytes; a second
  merge collects the live entries of the packs to repack;
- the consolidated index is written from the table read in pack order (SQLite's own
  external sort), ``INDEX_CHUNK`` entries per object.

What stays in memory grows with the number of packs, not of blocks (and the live
entries of the packs being repacked). The results are those of the in-memory path.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Iterator
from itertools import islice

from vault import names
from vault.extsort import SortedSet
from vault.index import BlockIndex, Index, Location
from vault.indexdb import DiskIndex
from vault.indexopen import estimate_blocks
from vault.pack import PackEntry
from vault.repo import Vault

PER_BLOCK = 500  # bytes a block costs the in-memory collection (measured: 2.4 GiB at 5 M)
INDEX_CHUNK = 200_000


async def fits_in_memory(vault: Vault, memory: int | None, leased: int = 0) -> bool:
    """Whether the in-memory collection fits ``memory`` bytes (None: no budget), with
    ``leased`` more block ids in its live set (those of cycles in progress)."""
    return memory is None or (await estimate_blocks(vault) + leased) * PER_BLOCK <= memory


def live_set(memory: int, temp_dir: str | os.PathLike[str] | None) -> SortedSet:
    """The mark's set of live block ids: half of the budget."""
    return SortedSet(32, memory // 2, temp_dir=temp_dir)


async def open_index(vault: Vault, index_dir: str | os.PathLike[str], memory: int
                     ) -> DiskIndex:
    """The vault's ``DiskIndex`` in ``index_dir``, up to date, its page cache a quarter of
    the budget."""
    blocks = await estimate_blocks(vault)
    index = await asyncio.to_thread(DiskIndex.open, index_dir, vault.config.vault_id,
                                    expect=blocks, cache_bytes=max(1 << 20, memory // 4))
    try:
        return await vault.refresh_index(index)
    except BaseException:
        index.close()
        raise


def scan(index: BlockIndex, *, by_pack: bool = False) -> Iterator[tuple[bytes, Location]]:
    """The index's entries in block-id order, or by pack and offset."""
    if isinstance(index, DiskIndex):
        return index.scan(by_pack=by_pack)
    assert isinstance(index, Index)
    key = (lambda kv: (kv[1].pack_id, kv[1].offset)) if by_pack else None
    return iter(sorted(index.entries.items(), key=key))


def _merge(entries: Iterable[tuple[bytes, Location]], live: Iterable[bytes]
           ) -> Iterator[tuple[bytes, Location, bool]]:
    """Each entry (in id order) and whether its block is live (``live`` in id order)."""
    it = iter(live)
    cur = next(it, None)
    for bid, loc in entries:
        while cur is not None and cur < bid:
            cur = next(it, None)
        yield bid, loc, cur == bid


def plan_packs(index: BlockIndex, live: Iterable[bytes], repack_below: float
               ) -> tuple[set[str], list[tuple[str, list[tuple[bytes, Location]]]]]:
    """The packs kept as they are, and the live entries of the packs to repack (live
    bytes below ``repack_below`` of their total); every other pack is dead. Two merges
    of the index with the live ids; runs on a worker thread."""
    totals: dict[str, list[int]] = {}
    for _bid, loc, is_live in _merge(scan(index), live):
        t = totals.get(loc.pack_id)
        if t is None:
            t = totals[loc.pack_id] = [0, 0]
        t[0] += loc.length
        if is_live:
            t[1] += loc.length
    keep: set[str] = set()
    repack: set[str] = set()
    for pack_id, (total, live_bytes) in totals.items():
        if live_bytes == 0:
            continue
        if live_bytes / total < repack_below:
            repack.add(pack_id)
        else:
            keep.add(pack_id)
    work: dict[str, list[tuple[bytes, Location]]] = {}
    if repack:
        for bid, loc, is_live in _merge(scan(index), live):
            if is_live and loc.pack_id in repack:
                work.setdefault(loc.pack_id, []).append((bid, loc))
    return keep, sorted(work.items())


async def write_index(vault: Vault, index: BlockIndex, keep: set[str],
                      new_packs: dict[str, list[PackEntry]]) -> list[str]:
    """Write the consolidated index: the entries of the ``keep`` packs (read from
    ``index`` in pack order), then ``new_packs``; returns the new objects' store names."""
    written: list[str] = []
    batch: dict[str, list[PackEntry]] = {}
    count = 0

    async def flush() -> None:
        nonlocal batch, count
        if batch:
            written.append(await vault.put_index(batch))
            batch, count = {}, 0

    rows = (r for r in scan(index, by_pack=True) if r[1].pack_id in keep)
    while chunk := await asyncio.to_thread(lambda: list(islice(rows, 50_000))):
        for bid, loc in chunk:
            if count >= INDEX_CHUNK and loc.pack_id not in batch:
                await flush()  # a pack stays whole in one object, as in the in-memory path
            batch.setdefault(loc.pack_id, []).append(PackEntry(bid, loc.offset, loc.length))
            count += 1
    for pack_id, entries in new_packs.items():
        batch[pack_id] = entries
        count += len(entries)
        if count >= INDEX_CHUNK:
            await flush()
    await flush()
    return [names.INDEX + n for n in written]
