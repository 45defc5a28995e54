"""``CycleWriter``: turn one replication cycle's changed blocks into a recovery point.

Used by the process server. Blocks are hashed (keyed BLAKE3) and deduplicated
against the index, sealed into packs on worker threads, uploaded with bounded
concurrency. ``checkpoint`` makes everything added so far durable in the vault
(packs, then an index object for them) and returns the block-map changes added
since the last checkpoint, for the caller to journal; ``finish`` writes the last
packs and index, then the maps, then the manifest, so the point is visible only
when whole (invariant 2). The point's name is derived from the machine and cycle,
so processing a cycle again after a crash rewrites the same point, never a second.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from itertools import islice

import zstandard

from common.digest import block_count, is_zero
from common.timefmt import now_iso
from vault import names
from vault.blockchanges import SPILL_ENTRIES, BlockChanges
from vault.crypto import Keyring
from vault.index import BlockIndex, Index
from vault.mapchain import chain_entries
from vault.mapranges import RANGE_BLOCKS, ChainRanges
from vault.maps import DELTA, FULL, ZERO_ID, MapBuilder
from vault.mapspool import MapSpool
from vault.pack import ZSTD_LEVEL, PackEntry, build_pack, pack_compressor
from vault.point import DiskEntry, Point
from vault.repo import MAX_CHAIN, Vault

PACK_TARGET = 8 << 20
# Blocks are compressed at ``ZSTD_LEVEL`` (vault/pack.py) unless a vault object is told
# otherwise (``Vault.zstd_level``, the process server's ``pack_zstd_level``), with a match
# table of at least 2^``ZSTD_MIN_HASH_LOG`` entries (``pack_compressor``): compression
# is the largest CPU cost of an upload (README, "Compression"). Incompressible blocks cost
# zstd next to nothing at any level (it gives up early) and are stored as they are.
# Readers do not care.


class MissingBlocksError(Exception):
    """A block the point would reference is in no index (removed by a prune)."""
MAX_INFLIGHT_PACKS = 3

_local = threading.local()

JournalEntry = tuple[int, int, bytes]


def thread_compressor(level: int = ZSTD_LEVEL) -> zstandard.ZstdCompressor:
    """This thread's compressor at ``level``: zstandard objects must not be shared."""
    by_level: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "zc", None)
    if by_level is None:
        by_level = _local.zc = {}
    c = by_level.get(level)
    if c is None:
        c = by_level[level] = pack_compressor(level)
    return c


@dataclass(frozen=True)
class DiskSpec:
    name: str
    size: int
    block_size: int


@dataclass(eq=False)
class _Batch:
    """The packs written between two checkpoints and the block ids they store."""

    packs: dict[str, list[PackEntry]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    ids: set[bytes] = field(default_factory=set)


class CycleWriter:
    """One cycle's blocks into packs, checkpoints and finally a point.

    ``checkpoint`` (or ``start_checkpoint``, which lets the caller go on adding blocks
    while the vault writes) makes everything added so far durable: its packs, then one
    index object for them. Checkpoints complete in the order they were started, each
    only after the ones before it, because a block added after a checkpoint started may
    be stored in that checkpoint's packs (it is never stored twice).
    """

    def __init__(
        self,
        vault: Vault,
        index: BlockIndex,
        executor: Executor,
        *,
        machine: str,
        cycle: str,
        disks: Sequence[DiskSpec],
        full: bool,
        base: Point | None,
        on_pack: Callable[[int, int], None] | None = None,
        before_pack: Callable[[str], Awaitable[None]] | None = None,
        range_blocks: int = RANGE_BLOCKS,
        spill_dir: str | os.PathLike[str] | None = None,
        changes_limit: int = SPILL_ENTRIES,
    ) -> None:
        if not full and base is None:
            raise ValueError("a delta cycle needs a base point")
        if range_blocks < 1:
            raise ValueError(f"a range is at least one block, not {range_blocks}")
        self.range_blocks = range_blocks  # a full map merged from the base's, per range
        self.spill_dir = spill_dir  # where changes past their budget and maps are spooled
        self.vault, self.index, self.executor = vault, index, executor
        self.machine, self.cycle, self.disks = machine, cycle, list(disks)
        self.full, self.base = full, base
        # Every block recorded, per disk: 40 bytes a block, past ``changes_limit`` of a
        # disk's in run files in ``spill_dir`` (``vault/blockchanges.py``).
        self.changes = [BlockChanges(limit=changes_limit, spill_dir=spill_dir)
                        for _ in self.disks]
        self._pending: list[tuple[bytes, bytes | memoryview]] = []
        self._pending_bytes = 0
        self._batch = _Batch()
        self._sealing: list[_Batch] = []  # batches whose checkpoint is running
        self._inflight: set[asyncio.Task[None]] = set()
        self._last_checkpoint: asyncio.Task[list[JournalEntry]] | None = None
        self._error: BaseException | None = None
        self._on_pack = on_pack
        # Awaited with a pack's id before the pack is put (the caller records it as its own).
        self._before_pack = before_pack
        self._journal: list[JournalEntry] = []
        self.stored_bytes = 0
        self.logical_bytes = 0

    def block_count(self) -> int:
        """How many distinct blocks (data or zero) this cycle has recorded."""
        return sum(len(c) for c in self.changes)

    def unindexed(self) -> int:
        """How many of the blocks recorded so far are in no index (after a prune ran
        while the cycle waited): looked up in batches, not one by one."""
        return sum(_count_unindexed(self.index, c.ids()) for c in self.changes)

    def replay(self, entries: Sequence[JournalEntry]) -> None:
        """Restore map changes journaled by earlier checkpoints of this cycle."""
        for d, n, bid in entries:
            self.changes[d].set(n, bid)

    def _unknown(self, ids: Sequence[bytes | None]) -> set[bytes]:
        """Those of ``ids`` stored by no pack yet: in no index, nor in a pack of this
        cycle that is being written. The index is asked once, for all of them, in id order
        (``BlockIndex.lookup``: one read of the on-disk index per few hundred, not one
        each). A block in neither may still be stored by another writer meanwhile: then
        it is stored twice, as it would be had both asked one block at a time."""
        fresh = {b for b in ids if b is not None and b not in self._batch.ids
                 and not any(b in batch.ids for batch in self._sealing)}
        if fresh:
            fresh.difference_update(self.index.lookup(fresh))
        return fresh

    async def add(self, items: Sequence[tuple[int, int, bytes | memoryview | None]]) -> None:
        """Record ``(disk_index, block_number, data or None for a zero block)``.

        The data is referenced, not copied, until the pack holding it is sealed (at the
        latest when the next checkpoint's packs are written)."""
        self._raise_failed()
        data_items = [(d, n, b) for d, n, b in items if b is not None]
        loop = asyncio.get_running_loop()
        blocks: list[bytes | memoryview] = [b for _, _, b in data_items]
        ids = await loop.run_in_executor(self.executor, _hash_all, self.vault, blocks)
        unknown = self._unknown(ids)
        next_id = iter(ids).__next__
        # In the order they came (a disk's blocks in increasing order, as its changes
        # keep them best): zero blocks among the others.
        for d, n, b in items:
            bid = None if b is None else next_id()
            self.changes[d].set(n, bid or ZERO_ID)
            self._journal.append((d, n, bid or ZERO_ID))
            if bid is None or bid not in unknown:
                continue
            assert b is not None
            unknown.discard(bid)  # stored once, however often it appears here
            self._pending.append((bid, b))
            self._batch.ids.add(bid)
            self._pending_bytes += len(b)
            if self._pending_bytes >= PACK_TARGET:
                await self._flush()

    def _raise_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _pack_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    async def _flush(self) -> None:
        if not self._pending:
            return
        blocks, self._pending, self._pending_bytes = self._pending, [], 0
        while len(self._inflight) >= MAX_INFLIGHT_PACKS:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
        self._raise_failed()
        task = asyncio.create_task(self._write_pack(blocks, self._batch.packs))
        task.add_done_callback(self._pack_done)
        self._inflight.add(task)
        self._batch.tasks.append(task)

    async def _write_pack(self, blocks: list[tuple[bytes, bytes | memoryview]],
                          packs: dict[str, list[PackEntry]]) -> None:
        pack_id = names.random_id()
        logical = sum(len(b) for _, b in blocks)
        loop = asyncio.get_running_loop()
        data, entries = await loop.run_in_executor(
            self.executor, _build_pack, self.vault.keyring, pack_id, blocks,
            self.vault.frame_bytes, self.vault.zstd_level)
        del blocks  # the caller's buffers are free once the pack is sealed
        if self._before_pack is not None:
            await self._before_pack(pack_id)
        await self.vault.put_pack(pack_id, data)
        packs[pack_id] = entries
        self.stored_bytes += len(data)
        self.logical_bytes += logical
        if self._on_pack is not None:
            self._on_pack(logical, len(data))

    async def start_checkpoint(self) -> asyncio.Task[list[JournalEntry]]:
        """Begin making every block added so far durable and indexed.

        Returns a task that completes after every earlier checkpoint, once this one's
        packs and their index object are in the vault, with the map changes added since
        the previous checkpoint, for the caller to journal. Blocks added from now on
        belong to the next checkpoint."""
        await self._flush()
        batch, self._batch = self._batch, _Batch()
        self._sealing.append(batch)
        journal, self._journal = self._journal, []
        task = asyncio.create_task(self._commit(batch, journal, self._last_checkpoint))
        self._last_checkpoint = task
        return task

    async def _commit(self, batch: _Batch, journal: list[JournalEntry],
                      before: asyncio.Task[list[JournalEntry]] | None) -> list[JournalEntry]:
        if before is not None:
            await before
        if batch.tasks:
            await asyncio.gather(*batch.tasks)
        if batch.packs:
            await self.vault.put_index(batch.packs, self.index)
        self._sealing.remove(batch)
        return journal

    async def checkpoint(self) -> list[JournalEntry]:
        """Make every block added so far durable and indexed; return the new map changes."""
        return await (await self.start_checkpoint())

    async def finish(self, digests: dict[str, str], consistency: str,
                     created: str | None = None) -> Point:
        await self.checkpoint()
        point_id = self.vault.keyring.name_for("point", self.machine, self.cycle)
        if await self.vault.has_point(point_id):
            self._drop_changes()
            return await self.vault.read_point(point_id)
        chain = 0 if self.full or self.base is None else self.base.chain + 1
        write_full = self.full or chain > MAX_CHAIN
        disk_entries = []
        for i, spec in enumerate(self.disks):
            changes = self.changes[i]
            # Spooled to a file and put a part at a time (format 2 on): the map of a
            # large disk is never held whole.
            m = self.vault.map_writer(FULL if write_full else DELTA, spec.size,
                                      spec.block_size, spool_dir=self.spill_dir)
            try:
                if write_full and not self.full:  # the chain's 17th: the base's map merged
                    missing = await self._merged_full(spec, changes, m)
                else:
                    # A full cycle: every block of the disk is in its changes, zero ones
                    # left out of the map; a delta map says which blocks became zero.
                    m.extend((n, b) for n, b in changes.items()
                             if not (write_full and b == ZERO_ID))
                    missing = _count_unindexed(self.index, changes.ids())
                if missing:
                    # Never write a point that cannot be restored.
                    raise MissingBlocksError(
                        f"cycle {self.cycle}: {missing} block(s) of disk {spec.name!r} are "
                        "in no index (a prune removed them while the cycle waited in the "
                        "cache)")
                map_id = await self.vault.put_map(m)
            finally:
                m.close()
            disk_entries.append(DiskEntry(
                disk=spec.name, size=spec.size, block_size=spec.block_size, map=map_id,
                map_kind="full" if write_full else "delta", digest=digests[spec.name],
            ))
        point = Point(
            id=point_id, machine=self.machine, created=created or now_iso(),
            consistency=consistency, cycle=self.cycle,
            base=None if write_full or self.base is None else self.base.id,
            chain=0 if write_full else chain, disks=disk_entries,
            format=self.vault.config.format,
        )
        await self.vault.put_point(point)
        self._drop_changes()
        return point

    def _drop_changes(self) -> None:
        """The changes are in the point's maps, or the cycle is aborted: drop them and
        their run files (a failed finish keeps them, for the caller to try again)."""
        for c in self.changes:
            c.close()

    async def _merged_full(self, spec: DiskSpec, changes: BlockChanges,
                           out: MapBuilder | MapSpool) -> int:
        """Write into ``out`` a full map of ``spec``: the base's map with this cycle's
        ``changes``, merged a range at a time along the base's chain of maps
        (vault/mapranges.py), not in a dict of the disk; return how many of its ids are
        in no index."""
        assert self.base is not None
        ranges = ChainRanges(await chain_entries(self.vault, self.base, spec.name),
                             block_count(spec.size, spec.block_size))
        todo = changes.items()
        nxt = next(todo, None)
        missing = 0
        async for _first, end, blocks in ranges.walk(self.range_blocks):
            while nxt is not None and nxt[0] < end:
                n, bid = nxt
                nxt = next(todo, None)
                if bid == ZERO_ID:
                    blocks.pop(n, None)
                else:
                    blocks[n] = bid
            merged = sorted(blocks.items())
            missing += _count_unindexed(self.index, (b for _, b in merged))
            out.extend(merged)
        if nxt is not None:
            raise ValueError(f"cycle {self.cycle}: block {nxt[0]} lies beyond disk "
                             f"{spec.name!r}")
        return missing

    async def abort(self) -> None:
        """Cancel the pack writes and checkpoints still running (nothing partial becomes
        visible: an index object is written only after its packs)."""
        tasks = [*self._inflight, *([self._last_checkpoint] if self._last_checkpoint else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        self._drop_changes()


LOOKUP_BATCH = 65_536  # ids asked of the index at once when a map is checked


def _count_unindexed(index: BlockIndex, ids: Iterable[bytes]) -> int:
    """How many of ``ids`` (zero ids aside) are in no index: looked up ``LOOKUP_BATCH``
    at a time (``BlockIndex.lookup``, in id order), not one by one."""
    if isinstance(index, Index):  # a dict: asking it one id at a time is the fastest
        return sum(1 for b in ids if b != ZERO_ID and b not in index.entries)
    missing = 0
    it = (b for b in ids if b != ZERO_ID)
    while chunk := list(islice(it, LOOKUP_BATCH)):
        found = index.lookup(chunk)
        if len(found) < len(chunk):
            missing += sum(1 for b in chunk if b not in found)
    return missing


def _build_pack(keyring: Keyring, pack_id: str, blocks: list[tuple[bytes, bytes | memoryview]],
                frame_bytes: int, level: int) -> tuple[bytearray, list[PackEntry]]:
    return build_pack(keyring, pack_id, blocks, thread_compressor(level), frame_bytes)


def _hash_all(vault: Vault, blocks: list[bytes | memoryview]) -> list[bytes | None]:
    block_id = vault.keyring.block_id
    return [None if is_zero(b) else block_id(b) for b in blocks]
