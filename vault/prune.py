"""Prune: forget points past retention, then collect garbage. Crash-safe, re-runnable.

The caller holds the vault's exclusive lock (vault/locks.py). Order, each step safe
to interrupt because every retained point stays resolvable throughout:

1. plan which points to keep (vault/retention.py), and read the leases of cycles in
   progress (vault/locks.py): their base points are kept, their blocks stay live;
2. rebase: a kept point whose delta chain passes through a forgotten point gets a
   full map written, then its manifest is replaced (same id, atomic put);
3. delete the forgotten manifests;
4. delete maps no point references;
5. repack: live blocks of mostly-dead packs are sealed into new packs;
6. write one consolidated index of the packs that stay (and the new ones),
   then delete the old index objects;
7. delete packs no index lists (dead, repacked, or left by a crashed writer);
8. delete expired leases.

An interrupted run leaves only garbage (unreferenced maps, unindexed packs, a
duplicate index), which the next run removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from common.digest import block_count
from vault import names, prunestream
from vault.chain import chain_of, crosses, rebase
from vault.extsort import SortedSet
from vault.index import Location
from vault.locks import Leases, leased_blocks, read_leases
from vault.mapchain import chain_entries
from vault.mapranges import RANGE_BLOCKS, ChainRanges
from vault.pack import Frames, PackEntry, build_pack, open_block
from vault.point import Point
from vault.prunestream import fits_in_memory, live_set
from vault.repo import Vault
from vault.retention import Retention, plan
from vault.writer import PACK_TARGET, thread_compressor

log = structlog.get_logger("vault.prune")
INDEX_CHUNK = 200_000


@dataclass
class PruneReport:
    kept: dict[str, str] = field(default_factory=dict)
    forgotten: list[str] = field(default_factory=list)
    rebased: list[str] = field(default_factory=list)
    maps_deleted: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    index_objects_replaced: int = 0
    bytes_deleted: int = 0
    cycles_in_progress: int = 0  # live leases honoured: their blocks and bases kept
    leases_deleted: int = 0


async def prune(
    vault: Vault, policy: Retention, executor: Executor, *, now: datetime | None = None,
    dry_run: bool = False, repack_below: float = 0.5,
    progress: Callable[[str], None] | None = None, memory: int | None = None,
    index_dir: str | os.PathLike[str] | None = None,
    temp_dir: str | os.PathLike[str] | None = None, range_blocks: int = RANGE_BLOCKS,
) -> PruneReport:
    """Prune ``vault`` by ``policy`` (see the module's docstring for the order).

    ``memory``: a budget in bytes for the garbage collection; when the vault's index
    does not fit it, the collection streams (vault/prunestream.py: the live ids sorted
    in ``temp_dir`` past the budget, the index a ``DiskIndex`` in ``index_dir``, or a
    temporary one, updated in place at the end). None: in memory, whatever the size.
    Either way each kept disk is marked ``range_blocks`` blocks at a time along its
    chain of maps (vault/mapranges.py), never resolved into a dict of the whole disk.

    Raises ``BrokenChainError`` (vault/chain.py), before it writes or deletes anything,
    if the delta chain of a point it would keep is broken: collecting garbage around a
    damaged point could delete what is left of it, so the damage is for an operator
    to see first ('siterecovery check')."""
    if range_blocks < 1:
        raise ValueError(f"a range is at least one block, not {range_blocks}")
    say = progress or (lambda _m: None)
    now = now or datetime.now(UTC)
    report = PruneReport()
    points = await vault.list_points()
    report.kept = plan(points, policy, now)
    # A cycle in progress (its writer let the lock go between segments) keeps its base
    # point and every block it references: they become a point's once it is written.
    # Leases expire by the clock (``now`` may be a retention's point of view).
    leases = await read_leases(vault)
    report.cycles_in_progress = len(leases.cycles)
    for base in leases.bases & {p.id for p in points}:
        report.kept.setdefault(base, "base of a cycle in progress")
    report.forgotten = [p.id for p in points if p.id not in report.kept]
    forget = set(report.forgotten)
    cache = {p.id: p for p in points}
    kept = [p for p in points if p.id in report.kept]

    for p in kept:  # every kept chain whole, before anything is written
        await chain_of(vault, p, cache)

    # 2. rebase kept points whose chain crosses a forgotten one (a point rebased here
    # cuts the chains of the later points built on it: they are walked afresh)
    for p in kept:
        if crosses(await chain_of(vault, p, cache), forget):
            report.rebased.append(p.id)
            if dry_run:
                continue
            cache[p.id] = await rebase(vault, p, cache, spool_dir=temp_dir)
    say(f"{len(report.forgotten)} points to forget, {len(report.rebased)} rebased")
    if dry_run:
        return report

    # 3. forget
    for pid in report.forgotten:
        await vault.store.delete(names.POINTS + pid)

    # 4. maps and blocks still referenced
    if not await fits_in_memory(vault, memory, leases.blocks):
        assert memory is not None
        with live_set(memory, temp_dir) as marked:
            await _prune_streaming(vault, report, kept, cache, leases, marked, executor,
                                   repack_below, memory, index_dir, temp_dir, say,
                                   range_blocks)
        await _finish(vault, report, leases)
        return report
    live_blocks: set[bytes] = set()
    async for ids in leased_blocks(vault, leases):
        live_blocks.update(ids)
    await _mark(vault, report, kept, cache, live_blocks, range_blocks)
    say(f"{report.maps_deleted} unreferenced maps deleted")

    # 5. repack mostly-dead packs
    old_index_names = [b.name async for b in vault.store.list(names.INDEX)]
    index = await vault.load_index()
    per_pack: dict[str, list[tuple[bytes, Location]]] = {}
    for bid, loc in index.entries.items():
        per_pack.setdefault(loc.pack_id, []).append((bid, loc))
    keep_packs: dict[str, list[PackEntry]] = {}
    to_repack: list[tuple[str, list[tuple[bytes, Location]]]] = []
    for pack_id, entries in per_pack.items():
        total = sum(loc.length for _, loc in entries)
        live = sum(loc.length for bid, loc in entries if bid in live_blocks)
        if live == 0:
            continue
        if live / total < repack_below:
            to_repack.append((pack_id, [(b, loc) for b, loc in entries if b in live_blocks]))
        else:
            keep_packs[pack_id] = [PackEntry(b, loc.offset, loc.length) for b, loc in entries]
    new_packs = await _repack(vault, to_repack, executor)
    report.packs_repacked = len(to_repack)
    report.packs_written = len(new_packs)
    keep_packs.update(new_packs)
    say(f"{len(to_repack)} packs repacked into {len(new_packs)}")

    # 6. one consolidated index, then the old index objects go
    batch: dict[str, list[PackEntry]] = {}
    count = 0
    for pack_id, pack_entries in keep_packs.items():
        batch[pack_id] = pack_entries
        count += len(pack_entries)
        if count >= INDEX_CHUNK:
            await vault.put_index(batch)
            batch, count = {}, 0
    if batch:
        await vault.put_index(batch)
    for name in old_index_names:
        await vault.store.delete(name)
    report.index_objects_replaced = len(old_index_names)

    # 7. packs that no index lists any more
    async for info in vault.store.list(names.PACKS):
        if names.pack_id_of(info.name) not in keep_packs:
            await vault.store.delete(info.name)
            report.packs_deleted += 1
            report.bytes_deleted += info.size
    say(f"{report.packs_deleted} packs deleted, {report.bytes_deleted / 1e6:.1f} MB freed")
    await _finish(vault, report, leases)
    return report


async def _mark(vault: Vault, report: PruneReport, kept: list[Point],
                cache: dict[str, Point], live_blocks: set[bytes] | SortedSet,
                range_blocks: int) -> None:
    """Step 4: add every block a kept point needs to ``live_blocks``; delete the maps
    that no kept point's chain references."""
    live_maps: set[str] = set()
    for p in kept:
        for q in await chain_of(vault, cache[p.id], cache):
            live_maps.update(d.map for d in q.disks)
        for d in p.disks:  # a range at a time along the chain's maps, not a dict
            ranges = ChainRanges(await chain_entries(vault, cache[p.id], d.disk),
                                 block_count(d.size, d.block_size))
            async for _first, _end, blocks in ranges.walk(range_blocks):
                live_blocks.update(blocks.values())
    async for info in vault.store.list(names.MAPS):
        if info.name[len(names.MAPS):] not in live_maps:
            await vault.store.delete(info.name)
            report.maps_deleted += 1
            report.bytes_deleted += info.size


async def _prune_streaming(
    vault: Vault, report: PruneReport, kept: list[Point], cache: dict[str, Point],
    leases: Leases, live: SortedSet, executor: Executor, repack_below: float,
    memory: int, index_dir: str | os.PathLike[str] | None,
    temp_dir: str | os.PathLike[str] | None, say: Callable[[str], None], range_blocks: int,
) -> None:
    """Steps 4-7 within ``memory`` bytes (vault/prunestream.py)."""
    say(f"the index does not fit {memory / 2**20:g} MiB: collecting through temporary files")
    async for ids in leased_blocks(vault, leases):  # a part at a time, into the sort
        live.update(ids)
    await _mark(vault, report, kept, cache, live, range_blocks)
    say(f"{report.maps_deleted} unreferenced maps deleted")
    old_index_names = [b.name async for b in vault.store.list(names.INDEX)]
    with contextlib.ExitStack() as stack:
        if index_dir is None:
            index_dir = stack.enter_context(tempfile.TemporaryDirectory(
                prefix="siterecovery-index-", dir=temp_dir))
        index = await prunestream.open_index(vault, index_dir, memory)
        stack.callback(index.close)
        keep, to_repack = await asyncio.to_thread(prunestream.plan_packs, index, live,
                                                  repack_below)
        new_packs = await _repack(vault, to_repack, executor)
        report.packs_repacked = len(to_repack)
        report.packs_written = len(new_packs)
        say(f"{len(to_repack)} packs repacked into {len(new_packs)}")
        written = await prunestream.write_index(vault, index, keep, new_packs)
        for name in old_index_names:
            await vault.store.delete(name)
        report.index_objects_replaced = len(old_index_names)
        drop = set(index.packs) - keep
        await asyncio.to_thread(index.replace_objects, written, new_packs, drop)
    keep.update(new_packs)
    async for info in vault.store.list(names.PACKS):
        if names.pack_id_of(info.name) not in keep:
            await vault.store.delete(info.name)
            report.packs_deleted += 1
            report.bytes_deleted += info.size
    say(f"{report.packs_deleted} packs deleted, {report.bytes_deleted / 1e6:.1f} MB freed")


async def _finish(vault: Vault, report: PruneReport, leases: Leases) -> None:
    # 8. leases of cycles that will never end (a process server gone for good), and
    # parts that fail to authenticate (they protect nothing)
    for name in leases.expired + leases.bad:
        await vault.store.delete(name)
    report.leases_deleted = len(leases.expired) + len(leases.bad)
    log.info("prune_finished", forgotten=len(report.forgotten), rebased=len(report.rebased),
             packs_deleted=report.packs_deleted, bytes_deleted=report.bytes_deleted,
             cycles_in_progress=report.cycles_in_progress)


async def _repack(vault: Vault, work: list[tuple[str, list[tuple[bytes, Location]]]],
                  executor: Executor) -> dict[str, list[PackEntry]]:
    loop = asyncio.get_running_loop()
    out: dict[str, list[PackEntry]] = {}
    pending: list[tuple[bytes, bytes]] = []
    size = 0

    async def flush() -> None:
        nonlocal pending, size
        if not pending:
            return
        blocks, pending, size = pending, [], 0
        pack_id = names.random_id()
        data, entries = await loop.run_in_executor(
            executor,
            lambda: build_pack(vault.keyring, pack_id, list(blocks),
                               thread_compressor(vault.zstd_level),
                               vault.frame_bytes))
        await vault.put_pack(pack_id, data)
        out[pack_id] = entries

    for pack_id, entries in work:
        at: tuple[int, int] = (-1, -1)
        sealed = b""
        frames: Frames = {}
        for bid, loc in sorted(entries, key=lambda e: e[1].offset):
            if (loc.offset, loc.length) != at:  # the blocks of one frame: read it once
                at = (loc.offset, loc.length)
                sealed = await vault.store.get(names.pack_name(pack_id), loc.offset,
                                               loc.length)
            # never copy unverified data
            data = open_block(vault.keyring, pack_id, bid, sealed, frames, loc.offset)
            pending.append((bid, data))
            size += len(data)
            if size >= PACK_TARGET:
                await flush()
    await flush()
    return out

