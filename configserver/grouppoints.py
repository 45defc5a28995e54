"""Group points: the coordinated moments of a consistency group, as the process server
that holds the group's barrier reports them (``procserver/barrier.py``).

A report names the group point, its group, when the barrier released (or failed), each
member's cycle and, for a failure, why. A released group point is ``complete`` once every
member's point of that cycle is in the catalog (whole in the vault), ``pending`` until
then, ``failed`` when a member's cycle fails after the release (a later report of the
process server, or ``configserver/groupsettle.py``); a failed one raises the event
``group_point_failed`` (each member's own points go on). Any other repeated report
changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db, groupsettle
from configserver.core import Core
from configserver.errors import NotFound
from configserver.groupmodels import ConsistencyGroup, GroupPoint
from configserver.groups import no_group
from configserver.schema import NAME, iso, nullable, obj

log = structlog.get_logger("configserver.grouppoints")

FAILED_EVENT = groupsettle.FAILED_EVENT
STATES = ("released", "failed")
_CYCLE = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
REPORT = obj({
    "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    "group": NAME,
    "created": {"type": "number", "minimum": 0, "maximum": 4102444800,
                "description": "UNIX seconds"},
    "state": {"enum": list(STATES)},
    "members": {"type": "object", "maxProperties": 64, "propertyNames": NAME,
                "additionalProperties": nullable(_CYCLE),
                "description": "machine -> its cycle at the group point (null: it did not "
                               "arrive)"},
    "error": nullable({"type": "string", "maxLength": 4000}),
}, ["id", "group", "created", "state", "members"])
MEMBER = obj({"machine": {"type": "string"}, "cycle": nullable({"type": "string"}),
              "point": nullable({"type": "string"})}, ["machine", "cycle", "point"])
GROUP_POINT = obj({
    "id": {"type": "string"}, "group": {"type": "string"}, "created": {"type": "string"},
    "state": {"enum": ["complete", "pending", "failed"],
              "description": "complete: every member's point is in the catalog"},
    "members": {"type": "array", "items": MEMBER}, "error": nullable({"type": "string"})},
    ["id", "group", "created", "state", "members", "error"])


async def record(core: Core, doc: dict[str, Any]) -> bool:
    """Store a process server's report; whether it changed anything. A ``failed`` report
    of a group point recorded ``released`` (a member's cycle failed after the barrier
    released it) marks it failed; any other repeat changes nothing."""
    now = core.clock()
    async with core.sessionmaker() as s:
        row = await s.get(GroupPoint, doc["id"], with_for_update=True)
        if row is not None:
            if row.state != "released" or doc["state"] != "failed":
                return False
            await groupsettle.fail(s, row, doc.get("error") or "a member's cycle failed "
                                   "after the barrier released it", now)
            await s.commit()
            return True
        s.add(GroupPoint(id=doc["id"], group_name=doc["group"], created=float(doc["created"]),
                         state=doc["state"], members=dict(doc["members"]),
                         error=doc.get("error"), finished=now))
        if doc["state"] == "failed":
            s.add(db.Event(time=now, severity="warning", code=FAILED_EVENT,
                           target=f"group:{doc['group']}",
                           message=f"group point {doc['id']} failed: "
                                   f"{doc.get('error') or 'a member did not arrive'} (each "
                                   "member's own points go on)", active=False))
        await s.commit()
    (log.warning if doc["state"] == "failed" else log.info)(
        "group_point_recorded", group=doc["group"], group_point=doc["id"], state=doc["state"],
        members=doc["members"], error=doc.get("error"))
    return True


async def _point_of(s: AsyncSession, machine: str, cycle: str | None) -> str | None:
    """The id of ``machine``'s point made of ``cycle`` (None: not in the catalog yet)."""
    if cycle is None:
        return None
    rows = (await s.execute(select(db.RecoveryPoint.id, db.RecoveryPoint.doc).where(
        db.RecoveryPoint.machine == machine, db.RecoveryPoint.doc.contains(cycle)))).all()
    for pid, text in rows:
        try:
            if json.loads(text).get("cycle") == cycle:
                return str(pid)
        except ValueError:
            continue
    return None


async def point_doc(s: AsyncSession, row: GroupPoint) -> dict[str, Any]:
    members = [{"machine": m, "cycle": c, "point": await _point_of(s, m, c)}
               for m, c in sorted(row.members.items())]
    state = "failed" if row.state == "failed" else (
        "complete" if all(m["point"] for m in members) else "pending")
    return {"id": row.id, "group": row.group_name, "created": iso(row.created),
            "state": state, "members": members, "error": row.error}


async def list_points(core: Core, group: str) -> list[dict[str, Any]]:
    async with core.sessionmaker() as s:
        if await s.get(ConsistencyGroup, group) is None:
            raise no_group(group)
        rows = (await s.execute(select(GroupPoint).where(GroupPoint.group_name == group)
                                .order_by(GroupPoint.created))).scalars().all()
        return [await point_doc(s, r) for r in rows]


async def get(core: Core, group: str, point: str) -> dict[str, Any]:
    async with core.sessionmaker() as s:
        row = await s.get(GroupPoint, point)
        if row is None or row.group_name != group:
            raise NotFound("group_point_not_found", f"group {group!r} has no group point "
                           f"{point!r}", f"list them: siterecovery group points {group}")
        return await point_doc(s, row)
