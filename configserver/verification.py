"""Verification of recovery points: each one is proved to materialize to its recorded
digests, reading only the blocks it needs (the work of ``check --read-data``, per point).

``due`` picks the points a run verifies: every point never verified, then those last
verified more than ``reverify_days`` ago, oldest verification first, at most a
``daily_share`` (percent of the retained points, at least one) of them — so the
re-verification of a large vault is spread over days, as Proxmox Backup Server's verify
jobs do. ``verify_points`` holds the vault's *shared* lock while it reads: uploads share
it and go on; a prune waits, so nothing a point needs is deleted under the verification.

What it holds does not grow with the disks or the vault: a disk is verified a range of
``range_blocks`` blocks at a time along its chain of maps held as their plaintexts
(vault/mapranges.py, 40 bytes a map entry), and the points of one machine's disk that
rest on the same full map go through their ranges together, so a block they share is
read once. A range's block ids are looked up in one batch, in the vault's index — in
memory, or past ``memory`` bytes in a table on local disk in a temporary directory
(vault/indexdb.py). The fingerprints of the blocks read are kept for later ranges and
points (a block several machines share is read once too) within what the index leaves
of ``memory`` (a quarter of it when the index is on disk); past it the oldest are let
go, and a block needed again is read again.

A point fails when one of its disks cannot be shown to restore to its manifest's digest;
its result names the store objects at fault (the map, the index, the pack whose block
failed to authenticate, or the manifest whose digest its blocks do not give).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from common.digest import DiskDigest, block_count
from vault import names
from vault.checkdata import chunks, open_blocks
from vault.errors import IntegrityError, NotFoundError, PermanentStoreError
from vault.index import BlockIndex, Index
from vault.indexopen import MEMORY_PER_BLOCK, open_block_index
from vault.locks import locked
from vault.mapchain import chain_entries
from vault.mapranges import RANGE_BLOCKS, ChainRanges
from vault.maps import MapView
from vault.pack import PackEntry
from vault.point import DiskEntry, Point
from vault.repo import MAX_CHAIN, Vault
from vault.restorejournal import ZeroFingerprints, place

CHUNK = 8 << 20  # bytes of a pack read at once, as check does
FP_ENTRY = 150  # bytes a kept fingerprint costs (a dict entry, the id, the fingerprint)
LOCK_WAIT = 600.0
DAY = 86400.0
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Damage:
    """A store object at fault, and why."""

    object: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"object": self.object, "reason": self.reason}


@dataclass
class PointResult:
    """The verification of one point: ``ok`` when every disk gave its recorded digest."""

    point: str
    machine: str
    created: str
    verified: float  # Unix time the verification ended
    disks: int = 0  # disks shown to restore to their digest
    damaged: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    @property
    def objects(self) -> list[str]:
        """The damaged objects' names, each once, in the order found."""
        return list(dict.fromkeys(d.object for d in self.damaged))

    def to_json(self) -> dict[str, object]:
        return {"point": self.point, "machine": self.machine, "created": self.created,
                "verified": self.verified, "ok": self.ok, "disks_verified": self.disks,
                "damaged": [d.to_json() for d in self.damaged]}


def due(points: Sequence[Point], last_verified: Mapping[str, float], now: float, *,
        reverify_days: float, daily_share: float) -> list[Point]:
    """The points a run verifies now (see the module's docstring): never-verified points
    (all of them, oldest first), then those due for re-verification (oldest verification
    first), the latter capped so a run takes at most ``daily_share`` percent of
    ``points`` (at least one)."""
    new = [p for p in points if p.id not in last_verified]
    stale = sorted((p for p in points if p.id in last_verified
                    and now - last_verified[p.id] >= reverify_days * DAY),
                   key=lambda p: (last_verified[p.id], p.created, p.id))
    cap = max(1, math.ceil(len(points) * daily_share / 100))
    return [*new, *stale[:max(0, cap - len(new))]]


async def verify_points(vault: Vault, points: Sequence[Point], executor: Executor | None,
                        *, clock: Callable[[], float], progress: Progress | None = None,
                        wait: float = LOCK_WAIT, memory: int | None = None,
                        index_dir: str | os.PathLike[str] | None = None,
                        temp_dir: str | os.PathLike[str] | None = None,
                        range_blocks: int = RANGE_BLOCKS) -> list[PointResult]:
    """Verify ``points`` of ``vault`` (in that order) under a shared lock, waiting up to
    ``wait`` seconds for an exclusive holder (``LockedError`` after).
    ``progress(done, total)`` counts bytes of the disks gone through. ``memory``: a
    budget in bytes (None: in memory whatever the size; see the module's docstring).
    Past it the index is a table in ``index_dir``, kept for the next run and brought up to
    date then (vault/indexopen.py), or without one in a temporary directory in
    ``temp_dir``, built for this run. Store errors other than a missing object raise: the
    vault could not be read, which proves nothing about the points."""
    if range_blocks < 1:
        raise ValueError(f"a range is at least one block, not {range_blocks}")
    async with locked(vault, "shared", "verify", wait=wait):
        with tempfile.TemporaryDirectory(prefix="siterecovery-verify-", dir=temp_dir) as tmp:
            where = None if memory is None else index_dir if index_dir is not None else tmp
            index = await open_block_index(vault, index_dir=where, memory=memory)
            try:
                return await _Verifier(vault, executor, index, progress, range_blocks,
                                       _keep(index, memory)).run(points, clock)
            finally:
                index.close()


def _keep(index: BlockIndex, memory: int | None) -> int | None:
    """How many fingerprints to keep between ranges within ``memory`` (None: all): what
    the index leaves of the budget when it is in memory, else a quarter of it (the
    on-disk index's cache takes another)."""
    if memory is None:
        return None
    if isinstance(index, Index):
        return max(0, memory - len(index) * MEMORY_PER_BLOCK) // FP_ENTRY
    return memory // 4 // FP_ENTRY


@dataclass
class _Disk:
    """One point's disk, verified range by range."""

    result: PointResult
    point: Point
    entry: DiskEntry
    ranges: ChainRanges
    nblocks: int
    zeros: ZeroFingerprints
    digest: DiskDigest = field(default_factory=DiskDigest)
    unindexed: int = 0
    first_unindexed: int = -1
    bad: dict[str, Damage] = field(default_factory=dict)  # pack -> the first block in it
    failed: bool = False  # its chain of maps broke: the damage is recorded


@dataclass
class _Range:
    """What the points of a range found: block id -> fingerprint, and ids in no index."""

    fps: dict[bytes, bytes] = field(default_factory=dict)
    absent: set[bytes] = field(default_factory=set)


class _Verifier:
    def __init__(self, vault: Vault, executor: Executor | None, index: BlockIndex,
                 progress: Progress | None, range_blocks: int, keep: int | None) -> None:
        self.vault, self.executor, self.index = vault, executor, index
        self.progress, self.range_blocks, self.keep = progress, range_blocks, keep
        self.known: dict[bytes, bytes] = {}  # block id -> fingerprint, the oldest first
        self.bad: dict[bytes, Damage] = {}  # block id -> the pack at fault
        self.done = self.total = 0

    async def run(self, points: Sequence[Point], clock: Callable[[], float]
                  ) -> list[PointResult]:
        results = {p.id: PointResult(p.id, p.machine, p.created, 0.0) for p in points}
        groups = await self._groups(points)
        self.total = sum(max(p.disk(disk).size for p in pts) for disk, pts in groups)
        for disk, pts in groups:
            await self._group(disk, pts, results)
        if self.progress is not None:
            self.progress(self.total, self.total)
        now = clock()
        for r in results.values():
            r.verified = now
        return list(results.values())

    async def _groups(self, points: Sequence[Point]) -> list[tuple[str, list[Point]]]:
        """``(disk, points)`` per machine's disk and the full map its points rest on, in
        the order first met."""
        groups: dict[tuple[str, str, str], tuple[str, list[Point]]] = {}
        known = {p.id: p for p in points}
        for p in points:
            for d in p.disks:
                root = await self._root(p, d.disk, known)
                groups.setdefault((p.machine, d.disk, root), (d.disk, []))[1].append(p)
        return list(groups.values())

    async def _root(self, p: Point, disk: str, known: dict[str, Point]) -> str:
        """The full map ``p``'s ``disk`` rests on (its manifests followed, no map read), or
        ``p``'s own id where they cannot be (``chain_entries`` then says why)."""
        q = p
        for _ in range(MAX_CHAIN + 2):
            try:
                entry = q.disk(disk)
            except KeyError:
                break
            if entry.map_kind == "full" or q.base is None:
                return entry.map
            base = known.get(q.base)
            if base is None:
                try:
                    base = known[q.base] = await self.vault.read_point(q.base)
                except (NotFoundError, IntegrityError):
                    break
            q = base
        return "point " + p.id

    async def _group(self, disk: str, pts: list[Point], results: dict[str, PointResult]
                     ) -> None:
        maps: dict[str, MapView] = {}  # the group's maps, each held once
        disks: list[_Disk] = []
        for p in pts:
            entry = p.disk(disk)
            try:
                ranges = ChainRanges(await chain_entries(self.vault, p, disk, maps),
                                     block_count(entry.size, entry.block_size))
            except IntegrityError as e:  # a missing or damaged map or base manifest
                results[p.id].damaged.append(Damage(e.object_name, f"disk {disk!r} of "
                                                    f"points/{p.id}: {e.reason}"))
                continue
            nblocks = block_count(entry.size, entry.block_size)
            disks.append(_Disk(results[p.id], p, entry, ranges, nblocks,
                               ZeroFingerprints(entry.size, entry.block_size)))
        size = max(p.disk(disk).size for p in pts)
        first = 0
        while live := [d for d in disks if not d.failed and first < d.nblocks]:
            end = first + self.range_blocks
            rng = _Range()
            for d in live:
                last = min(end, d.nblocks)
                try:
                    await d.ranges.load(last)
                    blocks = d.ranges.blocks(first, last)
                except IntegrityError as e:  # a map out of order or past the disk
                    d.failed = True
                    d.result.damaged.append(Damage(e.object_name, f"disk {disk!r} of "
                                                   f"points/{d.point.id}: {e.reason}"))
                    continue
                await self._fingerprints(blocks.values(), rng)
                self._apply(d, first, last, blocks, rng)
            self._keep(rng.fps)
            first = end
            if self.progress is not None:
                block_size = max(d.entry.block_size for d in live)
                self.progress(self.done + min(size, end * block_size), self.total)
        self.done += size
        for d in disks:
            self._finish(disk, d)

    async def _fingerprints(self, ids: Iterable[bytes], rng: _Range) -> None:
        """Put in ``rng`` the fingerprints of ``ids``, reading the blocks not known yet
        (one index lookup for all of them), and the ids that no index lists."""
        todo: set[bytes] = set()
        for b in ids:
            if b in rng.fps or b in rng.absent or b in self.bad:
                continue
            fp = self.known.get(b)
            if fp is None:
                todo.add(b)
            else:
                rng.fps[b] = fp
        if not todo:
            return
        found = (self.index.lookup(todo) if isinstance(self.index, Index)  # a dict: at once
                 else await asyncio.to_thread(self.index.lookup, todo))
        rng.absent.update(todo - found.keys())
        wanted: dict[str, list[PackEntry]] = {}
        for b, loc in found.items():
            wanted.setdefault(loc.pack_id, []).append(PackEntry(b, loc.offset, loc.length))
        await self._read(wanted, rng)

    def _apply(self, d: _Disk, first: int, end: int, blocks: dict[int, bytes],
               rng: _Range) -> None:
        """Feed a range's ``blocks`` to ``d``'s digest, or note what is wrong with them."""
        if d.unindexed or d.bad or any(b not in rng.fps for b in blocks.values()):
            for n, b in sorted(blocks.items()):
                if b in rng.absent:
                    if not d.unindexed:
                        d.first_unindexed = n
                    d.unindexed += 1
                    continue
                bad = self.bad.get(b)
                if bad is not None and bad.object not in d.bad:
                    d.bad[bad.object] = Damage(bad.object, f"disk {d.entry.disk!r} of "
                                               f"points/{d.point.id}, block {n}: {bad.reason}")
            return
        buf = d.zeros.range(first, end)
        place(buf, first, {n: rng.fps[b] for n, b in blocks.items()})
        d.digest.update(bytes(buf))

    def _finish(self, disk: str, d: _Disk) -> None:
        r, p = d.result, d.point
        if d.failed:
            return
        if d.unindexed:
            r.damaged.append(Damage(names.INDEX.rstrip("/"), (
                f"disk {disk!r} of points/{p.id}: {d.unindexed} block(s) are in no index "
                f"(first: block {d.first_unindexed})")))
        elif d.bad:
            r.damaged.extend(d.bad.values())
        elif (got := d.digest.hexdigest()) != d.entry.digest:
            r.damaged.append(Damage(names.POINTS + p.id, (
                f"disk {disk!r}: its blocks give digest {got[:16]}, the manifest records "
                f"{d.entry.digest[:16]}")))
        else:
            r.disks += 1

    def _keep(self, fps: dict[bytes, bytes]) -> None:
        """Keep a range's fingerprints for later ranges, the oldest let go past ``keep``."""
        self.known.update(fps)
        if self.keep is not None:
            over = len(self.known) - self.keep
            if over > 0:  # in one pass: the oldest are at the front
                for b in list(itertools.islice(self.known, over)):
                    del self.known[b]

    async def _read(self, wanted: dict[str, list[PackEntry]], rng: _Range) -> None:
        """Read and open the ``wanted`` blocks (pack id -> entries), a bounded span of a
        pack at a time, the next span's read under way while one's blocks are opened."""
        reads = [(pack_id, lo, hi, group) for pack_id in sorted(wanted)
                 for lo, hi, group in chunks(sorted(wanted[pack_id], key=lambda e: (
                     e.offset, e.length)), CHUNK)]
        loop = asyncio.get_running_loop()
        ahead: asyncio.Future[bytes | None] | None = None
        try:
            for i, (pack_id, lo, hi, group) in enumerate(reads):
                raw = await (ahead if ahead is not None else self._get(pack_id, lo, hi))
                ahead = (asyncio.ensure_future(self._get(*reads[i + 1][:3]))
                         if i + 1 < len(reads) else None)
                name = names.pack_name(pack_id)
                if raw is None:
                    for e in group:
                        self.bad[e.block_id] = Damage(name, "the pack is missing")
                    continue
                if len(raw) < hi - lo:  # the blocks past its end are lost, not those before
                    for e in group:
                        if e.offset + e.length > lo + len(raw):
                            self.bad[e.block_id] = Damage(name, "the pack is truncated")
                    group = [e for e in group if e.offset + e.length <= lo + len(raw)]
                results = await loop.run_in_executor(
                    self.executor, open_blocks, self.vault.keyring, pack_id, group, raw, lo)
                for e, fp_or_error in zip(group, results, strict=True):
                    if isinstance(fp_or_error, bytes):
                        rng.fps[e.block_id] = fp_or_error
                    else:
                        self.bad[e.block_id] = Damage(
                            name, f"block {e.block_id.hex()[:16]} at {e.offset} failed "
                                  f"verification: {fp_or_error}")
        finally:
            if ahead is not None and not ahead.done():
                ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)

    async def _get(self, pack_id: str, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` of the pack, or those of them it still has if it was cut
        short (a store refuses a range past an object's end: its size then tells); None
        if it is missing."""
        name = names.pack_name(pack_id)
        try:
            try:
                return await self.vault.store.get(name, lo, hi - lo)
            except PermanentStoreError:
                size = (await self.vault.store.stat(name)).size
                if size >= hi:
                    raise  # not a short pack: the store failed
                return await self.vault.store.get(name, lo, size - lo) if size > lo else b""
        except NotFoundError:
            return None
