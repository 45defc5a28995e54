"""The points part of a vault check (vault/check.py): every manifest authenticates, every
map it references matches its entry, every delta chain resolves, every block of a
resolved map is in the index and not in a pack or copy the earlier passes found bad,
and (with ``read_data``) every disk's blocks give its recorded digest.

A disk is checked a range of ``range_blocks`` blocks at a time along its chain of maps,
held as their plaintexts (vault/mapranges.py, 40 bytes a map entry), not resolved into a
dict of the whole disk: each range's ids looked up in one batch, its fingerprints fed to
the disk digest in block order. What it reports does not depend on the range size."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from common.digest import DiskDigest, block_count
from vault import names
from vault.checkreport import CheckReport
from vault.checkstore import Listing
from vault.errors import IntegrityError, MissingObjectError, NotFoundError
from vault.index import BlockIndex
from vault.mapchain import chain_entries, open_disk_map
from vault.mapranges import RANGE_BLOCKS, ChainRanges
from vault.maps import DELTA, FULL, MapEntries
from vault.point import Point
from vault.repo import MAX_CHAIN, Vault
from vault.restorejournal import ZeroFingerprints, place


@dataclass
class _Causes:
    """What a disk's ranges found, in block order: the blocks in no index (how many, the
    first) and the first block in a pack or copy found bad."""

    unindexed: int = 0
    first_unindexed: int = -1
    bad: str | None = None

    def any(self) -> bool:
        return self.unindexed > 0 or self.bad is not None


class PointChecks:
    """What the index and pack passes found (``sizes``: pack id -> size of the packs in
    the store; ``bad_packs``: pack id -> "missing" or "truncated"; ``bad_blocks``: block
    id -> the pack whose indexed copy failed), applied to the points."""

    def __init__(self, vault: Vault, report: CheckReport, index: BlockIndex,
                 listing: Listing, sizes: dict[str, int], bad_packs: dict[str, str],
                 bad_blocks: dict[bytes, str], *, range_blocks: int = RANGE_BLOCKS) -> None:
        if range_blocks < 1:
            raise ValueError(f"a range is at least one block, not {range_blocks}")
        self.vault, self.report, self.index, self.listing = vault, report, index, listing
        self.sizes, self.bad_packs, self.bad_blocks = sizes, bad_packs, bad_blocks
        self.range_blocks = range_blocks

    def add(self, obj: str, kind: str, reason: str) -> None:
        self.report.add(obj, kind, reason)

    async def check_points(self, point_objects: list[str]) -> None:
        """Check the manifests ``point_objects`` (listed before the index was loaded)."""
        points: dict[str, Point] = {}
        bad: set[str] = set()
        for name in point_objects:
            point_id = name[len(names.POINTS):]
            try:
                points[point_id] = await self.vault.read_point(point_id)
            except (NotFoundError, MissingObjectError):
                continue  # deleted while we listed
            except IntegrityError as e:
                self.add(name, "damaged", e.reason)
                bad.add(point_id)
        self.report.counts["points"] = len(points) + len(bad)
        maps: dict[str, str | None] = {}  # map id -> None if good, else why not
        for p in points.values():
            for d in p.disks:
                if d.map not in maps:
                    maps[d.map] = await self._check_map(p, d.disk, d.map)
        self.report.counts["maps"] = len(maps)
        for p in sorted(points.values(), key=lambda p: (p.created, p.id)):
            cause = self._chain_cause(p, points, bad, maps)
            if cause is not None:
                self.add(names.POINTS + p.id, "unrestorable", cause)
                continue
            for d in p.disks:
                await self._check_disk(p, d.disk)

    async def _check_map(self, p: Point, disk: str, map_id: str) -> str | None:
        name = names.MAPS + map_id
        try:
            m = await open_disk_map(self.vault, p, map_id)
            if isinstance(m, MapEntries):
                deque(m.iter(), maxlen=0)  # every entry in order and within the disk
            else:
                for i in range(len(m.firsts)):
                    await m.chunk(i)  # each chunk checked as it is read
        except (NotFoundError, MissingObjectError):
            self.add(name, "missing", f"points/{p.id} references it (disk {disk!r}), but it "
                                      "is not in the store")
            return f"{name} is missing"
        except IntegrityError as e:
            self.add(name, "damaged", e.reason)
            return f"{name} is damaged"
        entry = p.disk(disk)
        kind = {FULL: "full", DELTA: "delta"}[m.kind]
        if (kind, m.size, m.block_size) != (entry.map_kind, entry.size, entry.block_size):
            self.add(name, "mismatch", f"a {kind} map of {m.size} bytes in blocks of "
                                       f"{m.block_size}, but points/{p.id} says a "
                                       f"{entry.map_kind} map of {entry.size} bytes in blocks "
                                       f"of {entry.block_size}")
            return f"{name} does not match its manifest"
        return None

    def _chain_cause(self, p: Point, points: dict[str, Point], bad: set[str],
                     maps: dict[str, str | None]) -> str | None:
        """Why ``p``'s chain of manifests and maps is unusable, or None."""
        q: Point | None = p
        depth = 0
        while q is not None:
            for d in p.disks:
                try:
                    entry = q.disk(d.disk)
                except KeyError:
                    return f"its base points/{q.id} has no disk {d.disk!r}"
                why = maps.get(entry.map)
                if why is not None:
                    return why if q is p else f"{why} (in its delta chain, via points/{q.id})"
            if q.base is None:
                return None
            depth += 1
            if depth > MAX_CHAIN + 1:
                return f"its delta chain is longer than {MAX_CHAIN + 1} (a loop?)"
            if q.base in bad:
                return f"its base points/{q.base} is damaged"
            if q.base not in points:
                self.add(names.POINTS + q.base, "missing",
                         f"points/{q.id} is a delta on it, but it is not in the store")
                return f"its base points/{q.base} is missing"
            q = points[q.base]
        return None

    async def _check_disk(self, p: Point, disk: str) -> None:
        pname = names.POINTS + p.id
        entry = p.disk(disk)
        nblocks = block_count(entry.size, entry.block_size)
        try:
            ranges = ChainRanges(await chain_entries(self.vault, p, disk), nblocks)
        except (IntegrityError, NotFoundError) as e:
            self.add(pname, "unrestorable", f"disk {disk!r}: the delta chain does not "
                                            f"resolve: {e}")
            return
        zeros = ZeroFingerprints(entry.size, entry.block_size)
        digest: DiskDigest | None = DiskDigest() if self.report.read_data else None
        causes = _Causes()
        skipped = False
        walk = ranges.walk(self.range_blocks)
        while True:
            try:
                first, end, blocks = await anext(walk)
            except StopAsyncIteration:
                break
            except IntegrityError as e:
                self.add(pname, "unrestorable", f"disk {disk!r}: the delta chain does not "
                                                f"resolve: {e}")
                return
            self._range_causes(disk, blocks, causes)
            if digest is not None and not skipped and not causes.any():
                fps = self.listing.get_fps(blocks.values())
                if len(fps) < len(set(blocks.values())):
                    skipped = True  # a block was not read (a subset): no digest
                    continue
                buf = zeros.range(first, end)
                place(buf, first, {n: fps[b] for n, b in blocks.items()})
                digest.update(bytes(buf))
        if causes.unindexed:
            hint = ""
            if any(pack not in self.listing for pack in self.sizes):
                hint = "; some packs are unindexed: 'siterecovery rebuild-index' may recover them"
            self.add(pname, "unrestorable", f"disk {disk!r}: {causes.unindexed} block(s) it "
                                            f"needs are in no index (first: block "
                                            f"{causes.first_unindexed}){hint}")
            return
        if causes.bad is not None:
            self.add(pname, "unrestorable", causes.bad)
            return
        if digest is None:
            return
        if skipped:
            self.report.counts["digests_skipped"] += 1
            return
        got = digest.hexdigest()
        if got != entry.digest:
            self.add(pname, "mismatch", f"disk {disk!r}: its blocks give digest {got[:16]}, "
                                        f"the manifest records {entry.digest[:16]}")
        else:
            self.report.counts["digests_verified"] += 1

    def _range_causes(self, disk: str, blocks: dict[int, bytes], causes: _Causes) -> None:
        """Add what is wrong with a range's ``blocks`` (block -> id) to ``causes``."""
        found = self.index.lookup(set(blocks.values()))  # one batch, in id order
        for n, b in sorted(blocks.items()):
            loc = found.get(b)
            if loc is None:
                if not causes.unindexed:
                    causes.first_unindexed = n
                causes.unindexed += 1
                continue
            if causes.bad is not None or causes.unindexed:
                continue  # an unindexed block is reported first; the first bad one only
            pack_id = loc.pack_id
            if pack_id in self.bad_packs and (pack_id not in self.sizes or loc.offset
                                              + loc.length > self.sizes[pack_id]):
                causes.bad = (f"disk {disk!r}: block {n} is in {names.pack_name(pack_id)}, "
                              f"which is {self.bad_packs[pack_id]}")
            elif b in self.bad_blocks:
                causes.bad = f"disk {disk!r}: block {n} is damaged in {self.bad_blocks[b]}"
