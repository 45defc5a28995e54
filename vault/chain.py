"""Delta chains of recovery points: walking one, and cutting one (rebase).

A point whose maps are deltas names its ``base``, which may be a delta point itself.
A point's *chain* is the point, its base, the base's base, … down to a point with no
base. Writers keep a chain to at most ``MAX_CHAIN`` deltas (vault/writer.py writes a
full point instead), so a chain holds at most ``MAX_CHAIN + 1`` points.

A chain is *broken* when it does not reach a point without a base: a base manifest
is missing, or the chain is longer than any writer makes it (a loop). A point with a
broken chain cannot be materialized, so it cannot be rebased either: ``chain_of`` and
``rebase`` raise ``BrokenChainError`` for it, and each caller decides what that means
for it (prune stops before it changes anything; retention leaves the point as it is).
"""

from __future__ import annotations

import dataclasses
import os

from common.digest import block_count
from vault import names
from vault.errors import MissingObjectError
from vault.mapchain import chain_entries
from vault.mapranges import ChainRanges
from vault.maps import FULL
from vault.point import DiskEntry, Point
from vault.repo import MAX_CHAIN, Vault


class BrokenChainError(MissingObjectError):
    """The delta chain of ``point_id`` does not reach a full point; ``object_name`` is
    the manifest that is missing (or, for a chain that is too long, the point's own)."""

    def __init__(self, point_id: str, object_name: str, reason: str) -> None:
        super().__init__(object_name, reason)
        self.point_id = point_id


async def chain_of(vault: Vault, point: Point, known: dict[str, Point] | None = None
                   ) -> list[Point]:
    """``point`` and its bases, newest first, ending with the point that has no base.

    Bases are taken from ``known`` (point id -> point) when it has them, else read from
    the vault and added to it. Raises ``BrokenChainError`` if a base manifest is missing
    or the chain holds more than ``MAX_CHAIN + 1`` points; other errors of reading a
    manifest (``IntegrityError``, store errors) pass through.
    """
    cache = known if known is not None else {}
    chain = [point]
    while (base_id := chain[-1].base) is not None:
        if len(chain) > MAX_CHAIN:
            raise BrokenChainError(
                point.id, names.POINTS + point.id,
                f"its delta chain is longer than {MAX_CHAIN + 1} points (a loop?), so it "
                "cannot be restored; 'siterecovery check' lists what else is damaged")
        base = cache.get(base_id)
        if base is None:
            try:
                base = await vault.read_point(base_id)
            except MissingObjectError:
                raise BrokenChainError(
                    point.id, names.POINTS + base_id,
                    f"the manifest is missing, and points/{chain[-1].id} is a delta on it: "
                    f"points/{point.id} cannot be restored (nor rebased); 'siterecovery "
                    "check' lists what else is damaged") from None
            cache[base_id] = base
        chain.append(base)
    return chain


def crosses(chain: list[Point], ids: set[str]) -> bool:
    """Whether ``chain`` (from ``chain_of``) passes through one of the points ``ids``
    below its head: rebasing the head is what keeps it whole when those go."""
    return any(q.id in ids for q in chain[1:])


async def rebase(vault: Vault, point: Point, known: dict[str, Point] | None = None, *,
                 spool_dir: str | os.PathLike[str] | None = None) -> Point:
    """Cut ``point`` loose from its bases: write a full map of each of its disks, then
    replace its manifest (same id, one atomic put) by one with those maps and no base.
    Returns the new manifest; its restored disks are byte for byte those of ``point``.

    Raises ``BrokenChainError``, before writing anything, if ``point``'s chain is broken.
    Interrupted, it leaves ``point`` as it was plus unreferenced maps (prune's garbage).
    """
    await chain_of(vault, point, known)
    disks = []
    for d in point.disks:  # its chain's maps merged a range at a time, not in a dict
        ranges = ChainRanges(await chain_entries(vault, point, d.disk),
                             block_count(d.size, d.block_size))
        # Spooled (format 2 on): the new full map is never held whole either.
        full = vault.map_writer(FULL, d.size, d.block_size, spool_dir=spool_dir)
        try:
            async for _first, _end, blocks in ranges.walk():
                full.extend(sorted(blocks.items()))
            map_id = await vault.put_map(full)
        finally:
            full.close()
        disks.append(DiskEntry(d.disk, d.size, d.block_size, map_id, "full", d.digest))
    rebased = dataclasses.replace(point, base=None, chain=0, disks=disks,
                                  format=vault.config.format)
    await vault.put_point(rebased)
    return rebased
