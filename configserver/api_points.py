"""Routes: the recovery-point catalog, fed by process servers."""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from aiohttp import web
from sqlalchemy import delete, select

from common.labels import CONSISTENCY
from configserver import db, hostroles
from configserver.items import point_recorded
from configserver.rest import NAME, Call, Route, array, obj, reply

log = structlog.get_logger("configserver.points")

POINT = obj({"id": {"type": "string"}, "machine": {"type": "string"},
             "created": {"type": "string"}, "consistency": {"type": "string"}},
            ["id", "machine", "created", "consistency"])
POINT_ID = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
MAX_FORGOTTEN = 1000  # ids per request; a process server sends larger sets in batches
POINT_REPORT = {"type": "object", "required": ["id", "machine", "created", "consistency"],
                "properties": {"id": POINT_ID,
                               "machine": NAME,
                               "created": {"type": "string", "maxLength": 40},
                               "consistency": {"enum": list(CONSISTENCY)}}}


async def list_points(call: Call) -> web.Response:
    q = select(db.RecoveryPoint).order_by(db.RecoveryPoint.created)
    if "machine" in call.query:
        q = q.where(db.RecoveryPoint.machine == call.query["machine"])
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(q)).scalars().all()
    return reply({"points": [{"id": r.id, "machine": r.machine, "created": r.created,
                              "consistency": r.consistency} for r in rows]})


async def report_point(call: Call) -> web.Response:
    doc: dict[str, Any] = call.body
    pid, machine = doc["id"], doc["machine"]
    async with call.services.sessionmaker() as s:
        if await s.get(db.RecoveryPoint, pid) is None:
            s.add(db.RecoveryPoint(id=pid, machine=machine, created=doc["created"],
                                   consistency=doc["consistency"], doc=json.dumps(doc),
                                   received=time.time()))
            await s.commit()
            call.services.metrics.points.inc()
            await point_recorded(call.services, doc)
            await hostroles.point_reported(call.services, doc)
            await call.services.notify()
    log.info("point_recorded", point=pid, machine=machine, consistency=doc["consistency"])
    return reply({"id": pid}, status=201)


async def points_forgotten(call: Call) -> web.Response:
    """A process server's retention forgot these points in the vault: the catalog drops
    them too. Unknown ids are ignored, so a repeated report changes nothing."""
    ids = sorted(set(call.body["points"]))
    async with call.services.sessionmaker() as s:
        known = (await s.execute(select(db.RecoveryPoint.id).where(
            db.RecoveryPoint.id.in_(ids)))).scalars().all()
        if known:
            await s.execute(delete(db.RecoveryPoint).where(db.RecoveryPoint.id.in_(known)))
            await s.commit()
    if known:
        log.info("points_forgotten", count=len(known), points=sorted(known))
        await call.services.notify()
    return reply({"removed": len(known)})


ROUTES = [
    Route("GET", "/api/v1/points", list_points, "List recovery points in the catalog", "points",
          query={"machine": NAME}, responses={200: obj({"points": array(POINT)}, ["points"])}),
    Route("POST", "/api/v1/internal/points", report_point,
          "Record a recovery point (process servers)", "points", auth="internal",
          body=POINT_REPORT, responses={201: obj({"id": {"type": "string"}}, ["id"])},
          listeners=("admin", "site")),
    Route("POST", "/api/v1/internal/points/forgotten", points_forgotten,
          "Remove recovery points a process server's retention forgot (process servers)",
          "points", auth="internal", listeners=("admin", "site"),
          body=obj({"points": {**array(POINT_ID),
                               "maxItems": MAX_FORGOTTEN}}, ["points"]),
          responses={200: obj({"removed": {"type": "integer", "minimum": 0}}, ["removed"])},
          description="The points' manifests are gone from the vault. Ids the catalog does "
                      "not list are ignored (a repeated report removes nothing more); "
                      "'removed' counts the rows deleted."),
]
