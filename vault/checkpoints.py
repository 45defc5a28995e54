"""The points part of a vault check (vault/check.py): every manifest authenticates, every
map it references matches its entry, every delta chain resolves, every block of a
resolved map is in the index and not in a pack or copy the earlier passes found bad,
and (with ``read_data``) every disk's blocks give its recorded digest."""

from __future__ import annotations

from vault import names
from vault.checkdata import digest_from
from vault.checkreport import CheckReport
from vault.checkstore import Listing
from vault.errors import IntegrityError, MissingObjectError, NotFoundError
from vault.index import BlockIndex
from vault.maps import DELTA, FULL, ZERO_ID
from vault.point import Point
from vault.repo import MAX_CHAIN, Vault


class PointChecks:
    """What the index and pack passes found (``sizes``: pack id -> size of the packs in
    the store; ``bad_packs``: pack id -> "missing" or "truncated"; ``bad_blocks``: block
    id -> the pack whose indexed copy failed), applied to the points."""

    def __init__(self, vault: Vault, report: CheckReport, index: BlockIndex,
                 listing: Listing, sizes: dict[str, int], bad_packs: dict[str, str],
                 bad_blocks: dict[bytes, str]) -> None:
        self.vault, self.report, self.index, self.listing = vault, report, index, listing
        self.sizes, self.bad_packs, self.bad_blocks = sizes, bad_packs, bad_blocks

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
            m = await self.vault.read_map(map_id)
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
        try:
            bmap = await self.vault.resolve_map(p, disk)
        except (IntegrityError, NotFoundError) as e:
            self.add(pname, "unrestorable", f"disk {disk!r}: the delta chain does not "
                                            f"resolve: {e}")
            return
        blocks = {n: b for n, b in bmap.blocks.items() if b != ZERO_ID}
        cause = self._block_cause(disk, blocks)
        if cause is not None:
            self.add(pname, "unrestorable", cause)
            return
        if not self.report.read_data:
            return
        got = digest_from(entry.size, entry.block_size, blocks,
                          self.listing.get_fps(blocks.values()))
        if got is None:
            self.report.counts["digests_skipped"] += 1
        elif got != entry.digest:
            self.add(pname, "mismatch", f"disk {disk!r}: its blocks give digest {got[:16]}, "
                                        f"the manifest records {entry.digest[:16]}")
        else:
            self.report.counts["digests_verified"] += 1

    def _block_cause(self, disk: str, blocks: dict[int, bytes]) -> str | None:
        found = self.index.lookup(set(blocks.values()))  # one batch, in id order
        unindexed = [n for n, b in sorted(blocks.items()) if b not in found]
        if unindexed:
            hint = ""
            if any(p not in self.listing for p in self.sizes):
                hint = "; some packs are unindexed: 'siterecovery rebuild-index' may recover them"
            return (f"disk {disk!r}: {len(unindexed)} block(s) it needs are in no index "
                    f"(first: block {unindexed[0]}){hint}")
        for n, b in sorted(blocks.items()):
            loc = found[b]
            pack_id = loc.pack_id
            if pack_id in self.bad_packs and (pack_id not in self.sizes or loc.offset
                                              + loc.length > self.sizes[pack_id]):
                return (f"disk {disk!r}: block {n} is in {names.pack_name(pack_id)}, which "
                        f"is {self.bad_packs[pack_id]}")
            if b in self.bad_blocks:
                return f"disk {disk!r}: block {n} is damaged in {self.bad_blocks[b]}"
        return None
