"""``siterecovery vault migrate``: bring a vault of format 1 or 2 to format 3, in place,
under the vault's exclusive lock. Format 2 chunked the maps (``vault/mapchunks.py``);
format 3 writes new packs in frames of several blocks (``vault/pack.py``). Packs are not
written again: a pack holds single blocks or frames, and a reader tells each by its
authenticated type byte, so a vault at format 3 reads its older packs as they are.

The order makes every interruption harmless, and a second run finishes the work:

1. the config is written again with format 3: from then on maps are written chunked and
   packs in frames, and a program that knows only older formats refuses the vault (it
   could not read what is written now);
2. each point of format 1, one at a time: its maps are read (authenticated, every entry
   in order and within the disk), written again in chunks under new ids, the manifest is
   written again under the same id with format 3 and the new map ids, and only then are
   its old maps deleted. A point is always whole at one format or the other: the reader
   reads each point's maps by the format its manifest names, so a vault half migrated
   restores and checks like a whole one. An interruption between a manifest and the
   deletes leaves maps no point names: the run that finds every point's maps chunked
   (and none damaged) deletes them, as a prune would. Points of format 2 are left as
   they are: their maps are already chunked.

A point whose manifest or map is damaged is left as it is and reported (nothing of it
is read into the new maps), as ``check`` would report it.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vault import names
from vault.errors import IntegrityError, MissingObjectError, NotFoundError
from vault.mapchain import open_disk_map
from vault.mapchunks import seal_chunked
from vault.maps import MapEntries
from vault.point import CHUNKED_FORMAT, WRITTEN_FORMAT, DiskEntry, Point
from vault.repo import Vault


@dataclass
class MigrateReport:
    from_format: int  # the config's format before the run
    to_format: int
    points: int = 0  # points in the vault
    migrated: int = 0  # points written again this run
    maps_written: int = 0
    maps_deleted: int = 0
    #: ``(object, reason)`` of what was left as it is: damaged manifests, damaged or
    #: missing maps (their points stay at format 1)
    damaged: list[tuple[str, str]] = field(default_factory=list)


async def migrate(vault: Vault, *, progress: Callable[[str], None] | None = None,
                  limit: int | None = None) -> MigrateReport:
    """Migrate ``vault`` to format 3 (the caller holds the exclusive lock); at most
    ``limit`` points this run (None: all)."""
    say = progress or (lambda _m: None)
    report = MigrateReport(vault.config.format, WRITTEN_FORMAT)
    if vault.config.format < WRITTEN_FORMAT:
        await vault.set_format(WRITTEN_FORMAT)
        say(f"config written with format {WRITTEN_FORMAT}")
    scan = await vault.scan_points()
    report.damaged.extend((name, e.reason) for name, e in scan.damaged)
    report.points = len(scan.points)
    todo = [p for p in scan.points if p.format < CHUNKED_FORMAT]
    say(f"{len(todo)} of {len(scan.points)} points to write again")
    for p in todo:
        if limit is not None and report.migrated >= limit:
            break
        try:
            disks, old = await _rewrite_maps(vault, p, report)
        except IntegrityError as e:  # MissingObjectError included
            report.damaged.append((e.object_name, f"points/{p.id} (left at format "
                                                  f"{p.format}): {e.reason}"))
            continue
        await vault.put_point(dataclasses.replace(p, disks=disks, format=WRITTEN_FORMAT))
        report.migrated += 1
        for map_id in old:
            try:
                await vault.store.delete(names.MAPS + map_id)
                report.maps_deleted += 1
            except NotFoundError:
                pass
        say(f"point {p.id[:16]} of {p.machine} ({p.created}): {len(disks)} map(s) chunked")
    if not report.damaged and report.migrated == len(todo):
        await _sweep(vault, report, say)
    return report


async def _sweep(vault: Vault, report: MigrateReport, say: Callable[[str], None]) -> None:
    """Every point's maps chunked and none damaged: delete the maps no point names
    (those of a run killed between a manifest and its old maps' delete), as a prune
    would."""
    named = {d.map for p in (await vault.scan_points()).points for d in p.disks}
    left = 0
    async for info in vault.store.list(names.MAPS):
        if info.name[len(names.MAPS):] not in named:
            try:
                await vault.store.delete(info.name)
            except NotFoundError:
                continue
            left += 1
    if left:
        report.maps_deleted += left
        say(f"{left} map(s) no point names deleted (left by an interrupted run)")


async def _rewrite_maps(vault: Vault, p: Point, report: MigrateReport
                        ) -> tuple[list[DiskEntry], list[str]]:
    """``p``'s disks with their maps written again in chunks, and the old map ids."""
    disks: list[DiskEntry] = []
    for d in p.disks:
        m = await open_disk_map(vault, p, d.map)
        if not isinstance(m, MapEntries):  # pragma: no cover - a format 1 point's map
            raise MissingObjectError(names.MAPS + d.map, "not a format 1 map")
        deque(m.iter(), maxlen=0)  # every entry in order and within the disk
        map_id = names.random_id()
        await vault.store.put(names.MAPS + map_id, seal_chunked(
            vault.keyring, map_id, m.kind, m.size, m.block_size, m.body,
            vault.map_chunk_entries))
        report.maps_written += 1
        disks.append(dataclasses.replace(d, map=map_id))
    return disks, [d.map for d in p.disks]
