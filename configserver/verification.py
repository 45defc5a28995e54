"""Verification of recovery points: each one is proved to materialize to its recorded
digests, reading only the blocks it needs (the work of ``check --read-data``, per point).

``due`` picks the points a run verifies: every point never verified, then those last
verified more than ``reverify_days`` ago, oldest verification first, at most a
``daily_share`` (percent of the retained points, at least one) of them — so the
re-verification of a large vault is spread over days, as Proxmox Backup Server's verify
jobs do. ``verify_points`` holds the vault's *shared* lock while it reads: uploads share
it and go on; a prune waits, so nothing a point needs is deleted under the verification.

A point fails when one of its disks cannot be shown to restore to its manifest's digest;
its result names the store objects at fault (the map, the index, the pack whose block
failed to authenticate, or the manifest whose digest its blocks do not give).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from vault import names
from vault.checkdata import chunks, digest_from, open_blocks
from vault.errors import IntegrityError, NotFoundError
from vault.locks import locked
from vault.maps import ZERO_ID
from vault.pack import PackEntry
from vault.point import Point
from vault.repo import Vault

CHUNK = 8 << 20  # bytes of a pack read at once, as check does
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
                        wait: float = LOCK_WAIT) -> list[PointResult]:
    """Verify ``points`` of ``vault`` (in that order) under a shared lock, waiting up to
    ``wait`` seconds for an exclusive holder (``LockedError`` after). Each block is read
    once however many points share it; ``progress(done, total)`` counts bytes read.
    Store errors other than a missing object raise: the vault could not be read, which
    proves nothing about the points."""
    async with locked(vault, "shared", "verify", wait=wait):
        return await _Verifier(vault, executor, progress).run(points, clock)


class _Verifier:
    def __init__(self, vault: Vault, executor: Executor | None,
                 progress: Progress | None) -> None:
        self.vault, self.executor, self.progress = vault, executor, progress
        self.fps: dict[bytes, bytes] = {}  # block id -> fingerprint, blocks that verified
        self.bad: dict[bytes, Damage] = {}  # block id -> the pack at fault

    async def run(self, points: Sequence[Point], clock: Callable[[], float]
                  ) -> list[PointResult]:
        index = await self.vault.load_index()
        maps: dict[tuple[str, str], dict[int, bytes] | Damage] = {}
        for p in points:
            for d in p.disks:
                maps[(p.id, d.disk)] = await self._blocks_of(p, d.disk)
        wanted: dict[str, set[PackEntry]] = {}
        for blocks in maps.values():
            if isinstance(blocks, Damage):
                continue
            for bid in blocks.values():
                loc = index.entries.get(bid)
                if loc is None:
                    continue  # reported per disk below
                wanted.setdefault(loc.pack_id, set()).add(
                    PackEntry(bid, loc.offset, loc.length))
        await self._read(wanted)
        out = []
        for p in points:
            r = PointResult(p.id, p.machine, p.created, 0.0)
            for d in p.disks:
                blocks = maps[(p.id, d.disk)]
                if isinstance(blocks, Damage):
                    r.damaged.append(blocks)
                    continue
                found = self._damage(p, d.disk, blocks, index.entries)
                if found:
                    r.damaged.extend(found)
                    continue
                got = digest_from(d.size, d.block_size, blocks, self.fps)
                if got != d.digest:
                    r.damaged.append(Damage(names.POINTS + p.id, (
                        f"disk {d.disk!r}: its blocks give digest {str(got)[:16]}, the "
                        f"manifest records {d.digest[:16]}")))
                else:
                    r.disks += 1
            r.verified = clock()
            out.append(r)
        return out

    async def _blocks_of(self, p: Point, disk: str) -> dict[int, bytes] | Damage:
        try:
            m = await self.vault.resolve_map(p, disk)
        except IntegrityError as e:  # a missing or damaged map or base manifest
            return Damage(e.object_name, f"disk {disk!r} of points/{p.id}: {e.reason}")
        return {n: b for n, b in m.blocks.items() if b != ZERO_ID}

    def _damage(self, p: Point, disk: str, blocks: dict[int, bytes],
                entries: Mapping[bytes, object]) -> list[Damage]:
        unindexed = [n for n, b in sorted(blocks.items()) if b not in entries]
        if unindexed:
            return [Damage(names.INDEX.rstrip("/"), (
                f"disk {disk!r} of points/{p.id}: {len(unindexed)} block(s) are in no index "
                f"(first: block {unindexed[0]})"))]
        found: dict[str, Damage] = {}
        for n, b in sorted(blocks.items()):
            bad = self.bad.get(b)
            if bad is not None and bad.object not in found:
                found[bad.object] = Damage(bad.object, f"disk {disk!r} of points/{p.id}, "
                                                       f"block {n}: {bad.reason}")
        return list(found.values())

    async def _read(self, wanted: dict[str, set[PackEntry]]) -> None:
        total = sum(e.length for es in wanted.values() for e in es)
        done = 0
        loop = asyncio.get_running_loop()
        for pack_id in sorted(wanted):
            name = names.pack_name(pack_id)
            work = sorted(wanted[pack_id], key=lambda e: (e.offset, e.length))
            for lo, hi, group in chunks(work, CHUNK):
                try:
                    raw = await self.vault.store.get(name, lo, hi - lo)
                except NotFoundError:
                    for e in group:
                        self.bad[e.block_id] = Damage(name, "the pack is missing")
                    continue
                if len(raw) < hi - lo:
                    for e in group:
                        self.bad[e.block_id] = Damage(name, "the pack is truncated")
                    continue
                results = await loop.run_in_executor(
                    self.executor, open_blocks, self.vault.keyring, pack_id, group, raw, lo)
                for e, fp_or_error in zip(group, results, strict=True):
                    if isinstance(fp_or_error, bytes):
                        self.fps[e.block_id] = fp_or_error
                    else:
                        self.bad[e.block_id] = Damage(
                            name, f"block {e.block_id.hex()[:16]} at {e.offset} failed "
                                  f"verification: {fp_or_error}")
                done += sum(e.length for e in group)
                if self.progress is not None:
                    self.progress(done, total)
