"""Settling released group points: a group point whose barrier released is ``pending``
until every member's point of its cycle is in the catalog; this decides the ones whose
member's cycle will never make that point.

A member's cycle can still fail after the barrier released it: its connection breaks
and is not resumed, the agent dies, its END is refused, the process server drops the
cycle. The group point then ends ``failed``, with the event ``group_point_failed``
naming the member and why, when

1. **the member went on without it**: a point of the member was recorded after the
   group point was reported, taken after the group point's moment, and it is not the
   group point's cycle. A process server uploads each machine's cycles in the order it
   received them, so a later cycle's point means the group point's cycle was dropped; or
2. **the others are in and the member is not, for long**: every other member's point is
   in the catalog, and the member's has not come ``max(interval_seconds,
   SETTLE_MIN_SECONDS)`` seconds after the last of them (its agent stopped, its process
   server is gone).

A group point whose every member's point is in is stored ``complete`` and not looked
at again. ``run`` looks every ``interval`` seconds and soon after any change (every
recorded point is one).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.core import Core, next_pass
from configserver.groupmodels import ConsistencyGroup, GroupPoint

log = structlog.get_logger("configserver.groupsettle")

FAILED_EVENT = "group_point_failed"
SETTLE_MIN_SECONDS = 900.0
_MIN_GAP_S = 1.0


@dataclass(frozen=True)
class _Seen:
    """What the catalog holds of one member since the group point: its point of the
    group point's cycle, and when it was recorded; a later point of it, if any."""

    point_received: float | None
    later_point: str | None


def _created(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


async def _seen(s: AsyncSession, machine: str, cycle: str | None,
                row: GroupPoint) -> _Seen:
    received: float | None = None
    if cycle is not None:
        for got, text in (await s.execute(select(
                db.RecoveryPoint.received, db.RecoveryPoint.doc).where(
                db.RecoveryPoint.machine == machine,
                db.RecoveryPoint.doc.contains(cycle)))).all():
            if _cycle_of(text) == cycle:
                received = float(got)
    later: str | None = None
    if received is None:
        for pid, created, text in (await s.execute(select(
                db.RecoveryPoint.id, db.RecoveryPoint.created, db.RecoveryPoint.doc).where(
                db.RecoveryPoint.machine == machine,
                db.RecoveryPoint.received > (row.finished or row.created)))).all():
            if (_created(created) or 0.0) > row.created and _cycle_of(text) != cycle:
                later = str(pid)
                break
    return _Seen(received, later)


def _cycle_of(text: str) -> object:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc.get("cycle") if isinstance(doc, dict) else None


async def fail(s: AsyncSession, row: GroupPoint, why: str, now: float) -> None:
    """Mark ``row`` failed for ``why`` and raise its event (the caller commits)."""
    row.state, row.error = "failed", why
    s.add(db.Event(time=now, severity="warning", code=FAILED_EVENT,
                   target=f"group:{row.group_name}",
                   message=f"group point {row.id} failed: {why} (each member's own points "
                           "go on; the next group point is taken at the next interval)",
                   active=False))
    log.warning("group_point_failed", group=row.group_name, group_point=row.id, error=why)


async def settle_once(core: Core) -> dict[str, str]:
    """Decide every released group point that can be decided now: ``{id: state}`` of
    the ones decided (``complete`` or ``failed``)."""
    now = core.clock()
    decided: dict[str, str] = {}
    async with core.sessionmaker() as s:
        ids = (await s.execute(select(GroupPoint.id).where(
            GroupPoint.state == "released").order_by(GroupPoint.created))).scalars().all()
        for gid in ids:
            row = await s.get(GroupPoint, gid, with_for_update=True)
            if row is None or row.state != "released":
                continue
            group = await s.get(ConsistencyGroup, row.group_name)
            wait = max(float(group.interval_s) if group else 0.0, SETTLE_MIN_SECONDS)
            seen = {m: await _seen(s, m, c, row) for m, c in sorted(row.members.items())}
            missing = sorted(m for m, v in seen.items() if v.point_received is None)
            if not missing:
                row.state = "complete"
                decided[gid] = "complete"
                continue
            gone = [m for m in missing if seen[m].later_point is not None]
            if gone:
                await fail(s, row, "; ".join(
                    f"{m}'s cycle {row.members[m]} of this group point made no point: it "
                    f"failed or was abandoned after the barrier released it ({m}'s point "
                    f"{seen[m].later_point} of a later cycle is in the catalog)"
                    for m in gone), now)
                decided[gid] = "failed"
                continue
            others = [v.point_received for v in seen.values() if v.point_received is not None]
            if others and now - max(others) >= wait:
                await fail(s, row, f"{', '.join(missing)}: no point of its cycle of this "
                            f"group point {wait:g} s after the other members' points were "
                            "in the catalog (its agent or its process server stopped after "
                            "the barrier released it)", now)
                decided[gid] = "failed"
        await s.commit()
    if any(v == "failed" for v in decided.values()):
        await core.notify()
    return decided


async def run(core: Core, interval: float) -> None:
    """Settle group points every ``interval`` seconds and soon after a change (at most
    once a second)."""
    async with core.notifier.watching("group-point-settle") as dirty:
        while True:
            dirty.clear()
            try:
                await settle_once(core)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a catalog hiccup must not end the settling
                log.error("group_point_settle_failed", error=str(e),
                          error_type=type(e).__name__, retry_in_seconds=interval)
            await next_pass(dirty, min(_MIN_GAP_S, interval), interval)
