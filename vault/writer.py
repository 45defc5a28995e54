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
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import zstandard

from vault import names
from vault.crypto import ZSTD_LEVEL
from vault.index import Index
from vault.maps import DELTA, FULL, ZERO_ID, BlockMap
from vault.pack import PackEntry, build_pack
from vault.point import DiskEntry, Point, now_iso
from vault.repo import MAX_CHAIN, Vault

PACK_TARGET = 8 << 20


class MissingBlocksError(Exception):
    """A block the point would reference is in no index (removed by a prune)."""
MAX_INFLIGHT_PACKS = 3

_local = threading.local()


def thread_compressor() -> zstandard.ZstdCompressor:
    # One compressor per thread: zstandard objects must not be shared.
    c: zstandard.ZstdCompressor | None = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


@dataclass(frozen=True)
class DiskSpec:
    name: str
    size: int
    block_size: int


class CycleWriter:
    def __init__(
        self,
        vault: Vault,
        index: Index,
        executor: Executor,
        *,
        machine: str,
        cycle: str,
        disks: Sequence[DiskSpec],
        full: bool,
        base: Point | None,
        on_upload: Callable[[int], None] | None = None,
    ) -> None:
        if not full and base is None:
            raise ValueError("a delta cycle needs a base point")
        self.vault, self.index, self.executor = vault, index, executor
        self.machine, self.cycle, self.disks = machine, cycle, list(disks)
        self.full, self.base = full, base
        self.changes: list[dict[int, bytes]] = [{} for _ in self.disks]
        self._pending: list[tuple[bytes, bytes | memoryview]] = []
        self._pending_bytes = 0
        self._pending_ids: set[bytes] = set()
        self._new_packs: dict[str, list[PackEntry]] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._on_upload = on_upload
        self._journal: list[tuple[int, int, bytes]] = []
        self.stored_bytes = 0

    def block_count(self) -> int:
        """How many distinct blocks (data or zero) this cycle has recorded."""
        return sum(len(c) for c in self.changes)

    def replay(self, entries: Sequence[tuple[int, int, bytes]]) -> None:
        """Restore map changes journaled by earlier checkpoints of this cycle."""
        for d, n, bid in entries:
            self.changes[d][n] = bid

    async def add(self, items: Sequence[tuple[int, int, bytes | memoryview | None]]) -> None:
        """Record ``(disk_index, block_number, data or None for a zero block)``."""
        data_items = [(d, n, b) for d, n, b in items if b is not None]
        loop = asyncio.get_running_loop()
        blocks: list[bytes | memoryview] = [b for _, _, b in data_items]
        ids = await loop.run_in_executor(self.executor, _hash_all, self.vault, blocks)
        for d, n, b in items:
            if b is None:
                self.changes[d][n] = ZERO_ID
                self._journal.append((d, n, ZERO_ID))
        for (d, n, b), bid in zip(data_items, ids, strict=True):
            self.changes[d][n] = bid or ZERO_ID
            self._journal.append((d, n, bid or ZERO_ID))
            if bid is None:
                continue
            if bid in self.index or bid in self._pending_ids:
                continue
            assert b is not None
            self._pending.append((bid, b))
            self._pending_ids.add(bid)
            self._pending_bytes += len(b)
            if self._pending_bytes >= PACK_TARGET:
                await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        blocks, self._pending, self._pending_bytes = self._pending, [], 0
        while len(self._inflight) >= MAX_INFLIGHT_PACKS:
            done, _ = await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                self._inflight.discard(t)
                t.result()
        task = asyncio.create_task(self._write_pack(blocks))
        self._inflight.add(task)

    async def _write_pack(self, blocks: list[tuple[bytes, bytes | memoryview]]) -> None:
        pack_id = names.random_id()
        loop = asyncio.get_running_loop()
        data, entries = await loop.run_in_executor(
            self.executor,
            lambda: build_pack(self.vault.keyring, pack_id, blocks, thread_compressor())
        )
        await self.vault.put_pack(pack_id, data)
        self._new_packs[pack_id] = entries
        self.stored_bytes += len(data)
        if self._on_upload is not None:
            self._on_upload(len(data))

    async def checkpoint(self) -> list[tuple[int, int, bytes]]:
        """Make every block added so far durable and indexed; return the new map changes."""
        await self._flush()
        if self._inflight:
            await asyncio.gather(*self._inflight)
            self._inflight.clear()
        if self._new_packs:
            await self.vault.put_index(self._new_packs, self.index)
            self._new_packs = {}
        self._pending_ids.clear()
        journal, self._journal = self._journal, []
        return journal

    async def finish(self, digests: dict[str, str], consistency: str,
                     created: str | None = None) -> Point:
        await self.checkpoint()
        point_id = self.vault.keyring.name_for("point", self.machine, self.cycle)
        if await self.vault.has_point(point_id):
            return await self.vault.read_point(point_id)
        chain = 0 if self.full or self.base is None else self.base.chain + 1
        write_full = self.full or chain > MAX_CHAIN
        disk_entries = []
        for i, spec in enumerate(self.disks):
            if write_full:
                if self.full:
                    blocks = {n: b for n, b in self.changes[i].items() if b != ZERO_ID}
                else:
                    assert self.base is not None
                    resolved = await self.vault.resolve_map(self.base, spec.name)
                    blocks = resolved.blocks
                    for n, b in self.changes[i].items():
                        if b == ZERO_ID:
                            blocks.pop(n, None)
                        else:
                            blocks[n] = b
                m = BlockMap(FULL, spec.size, spec.block_size, blocks)
            else:
                m = BlockMap(DELTA, spec.size, spec.block_size, self.changes[i])
            missing = sum(1 for b in m.blocks.values()
                          if b != ZERO_ID and b not in self.index)
            if missing:
                # Never write a point that cannot be restored.
                raise MissingBlocksError(
                    f"cycle {self.cycle}: {missing} block(s) of disk {spec.name!r} are in no "
                    "index (a prune removed them while the cycle waited in the cache)")
            map_id = await self.vault.put_map(m)
            disk_entries.append(DiskEntry(
                disk=spec.name, size=spec.size, block_size=spec.block_size, map=map_id,
                map_kind="full" if write_full else "delta", digest=digests[spec.name],
            ))
        point = Point(
            id=point_id, machine=self.machine, created=created or now_iso(),
            consistency=consistency, cycle=self.cycle,
            base=None if write_full or self.base is None else self.base.id,
            chain=0 if write_full else chain, disks=disk_entries,
        )
        await self.vault.put_point(point)
        return point

    async def abort(self) -> None:
        for t in self._inflight:
            t.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        self._inflight.clear()


_ZERO = bytes(1 << 20)


def _hash_all(vault: Vault, blocks: list[bytes | memoryview]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for b in blocks:
        if _ZERO[: len(b)] == b:
            out.append(None)
        else:
            out.append(vault.keyring.block_id(b))
    return out
