"""Routes: events and alerts (an alert is an event that stays active while its condition
holds; see configserver/alerts.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from sqlalchemy import select

from configserver import alerts, db
from configserver.rest import Call, Route, array, iso, nullable, obj, reply

EVENT = obj({
    "id": {"type": "integer"},
    "time": {"type": "string", "description": "when it was raised"},
    "severity": {"type": "string", "description": "info, warning or critical"},
    "code": {"type": "string"},
    "target": {"type": "string", "description": "the process server or machine it is about"},
    "message": {"type": "string"},
    "active": {"type": "boolean"},
    "cleared_at": nullable({"type": "string"}),
}, ["id", "time", "severity", "code", "target", "message", "active", "cleared_at"])
EVENTS = obj({"events": array(EVENT)}, ["events"])


def event_doc(e: db.Event) -> dict[str, Any]:
    return {"id": e.id, "time": iso(e.time), "severity": e.severity, "code": e.code,
            "target": e.target, "message": e.message, "active": e.active,
            "cleared_at": iso(e.cleared_at)}


def _docs(rows: Sequence[db.Event]) -> dict[str, Any]:
    return {"events": [event_doc(e) for e in rows]}


async def list_events(call: Call) -> web.Response:
    q = select(db.Event).order_by(db.Event.time.desc(), db.Event.id.desc())
    if "active" in call.query:
        q = q.where(db.Event.active.is_(call.query["active"]))
    if "target" in call.query:
        q = q.where(db.Event.target == call.query["target"])
    if "code" in call.query:
        q = q.where(db.Event.code == call.query["code"])
    q = q.limit(call.query.get("limit", 500))
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(q)).scalars().all()
    return reply(_docs(rows))


async def evaluate_alerts(call: Call) -> web.Response:
    await alerts.evaluate(call.services, call.services.alert_book)
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(select(db.Event).where(db.Event.active.is_(True)).order_by(
            db.Event.time.desc(), db.Event.id.desc()))).scalars().all()
    return reply(_docs(rows))


ROUTES = [
    Route("GET", "/api/v1/events", list_events, "List events and alerts, newest first",
          "events",
          query={"active": {"type": "boolean"},
                 "target": {"type": "string", "minLength": 1, "maxLength": 255},
                 "code": {"type": "string", "minLength": 1, "maxLength": 64},
                 "limit": {"type": "integer", "minimum": 1, "maximum": 10000}},
          responses={200: EVENTS},
          description="active=true: the alerts that hold now; active=false: cleared ones. "
                      "limit defaults to 500."),
    Route("POST", "/api/v1/alerts/evaluate", evaluate_alerts,
          "Evaluate the alert conditions now; list the active alerts", "events",
          responses={200: EVENTS},
          description="The configuration server also evaluates every alert_interval_seconds, "
                      "after every process-server heartbeat and soon after new points."),
]
