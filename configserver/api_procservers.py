"""Routes: process servers — registration by heartbeat, health, refresh, removal.

A process server registers itself with its first heartbeat (internal token, on the
admin and the site listener) and then heartbeats every ``heartbeat_interval_seconds``
(30 s by default) with its health: cache use, upload backlog, throughput, sessions.
The answer tells it whether an operator asked for a refresh; it then re-pulls what it
gets from the configuration server and heartbeats again at once. It pulls the policies
of the replicated items whose machines are assigned to it (``GET
/api/v1/internal/procservers/{name}/policies``) and applies their retention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import structlog
from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from configserver import alerts, db
from configserver.api_policies import COLUMNS
from configserver.api_policies import FIELDS as POLICY_FIELDS
from configserver.rest import (
    ERROR_SCHEMA,
    NAME,
    ApiError,
    Call,
    Route,
    array,
    iso,
    not_found,
    obj,
    reply,
)

log = structlog.get_logger("configserver.procservers")

_BYTES = {"type": "integer", "minimum": 0, "maximum": 1 << 62}
HEARTBEAT = obj({
    "name": NAME,
    "address": {"type": "string", "pattern": "^[!-~]{1,255}$",
                "description": "host:port agents replicate to"},
    "version": {"type": "string", "maxLength": 40},
    "cache_bytes": _BYTES,
    "cache_free_ratio": {"type": "number", "minimum": 0, "maximum": 1,
                         "description": "share of the cache quota still free (0-1)"},
    "backlog_bytes": _BYTES,
    "backlog_seconds": {"type": "number", "minimum": 0, "maximum": 1e10,
                        "description": "age of the oldest data waiting for upload"},
    "throughput_bps": {"type": "number", "minimum": 0, "maximum": 1e15,
                       "description": "upload throughput into the vault, bytes per second"},
    "sessions": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
    "pending_cycles": {
        "type": "object", "maxProperties": 100_000, "propertyNames": NAME,
        "additionalProperties": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "description": "per machine, the cycles acknowledged to its agent whose point is not "
                       "whole in the vault yet (what a failover to 'latest' waits for)"},
    "storage_failing_seconds": {"type": "number", "minimum": 0, "maximum": 1e10,
                                "description": "how long uploads to the vault have been "
                                               "failing without a success (0: they are not)"},
    "storage_error": {"type": ["string", "null"], "maxLength": 1000,
                      "description": "the newest upload failure while they fail"},
}, ["name", "address", "version", "cache_bytes", "cache_free_ratio", "backlog_bytes",
    "backlog_seconds", "throughput_bps", "sessions"])
HEALTH = {"enum": ["normal", "warning", "critical"]}
ALERT = obj({"code": {"type": "string"}, "severity": {"type": "string"},
             "message": {"type": "string"}, "since": {"type": "string"}},
            ["code", "severity", "message", "since"])
PROCSERVER = obj({
    "name": {"type": "string"},
    "address": {"type": "string"},
    "version": {"type": "string"},
    "registered_at": {"type": "string"},
    "last_contact": {"type": "string"},
    "seconds_since_contact": {"type": "number", "minimum": 0},
    "cache_bytes": {"type": "integer"},
    "cache_free_ratio": {"type": "number"},
    "backlog_bytes": {"type": "integer"},
    "backlog_seconds": {"type": "number"},
    "throughput_bps": {"type": "number"},
    "sessions": {"type": "integer"},
    "storage_failing_seconds": {"type": "number", "minimum": 0,
                                "description": "how long its uploads to the vault have been "
                                               "failing without a success (0: they are not)"},
    "storage_error": {"type": ["string", "null"]},
    "refresh_requested": {"type": "boolean"},
    "machines": {"type": "integer", "minimum": 0,
                 "description": "machines assigned to this process server"},
    "health": HEALTH,
    "alerts": array(ALERT),
}, ["name", "address", "version", "registered_at", "last_contact", "seconds_since_contact",
    "cache_bytes", "cache_free_ratio", "backlog_bytes", "backlog_seconds", "throughput_bps",
    "sessions", "refresh_requested", "machines", "health", "alerts"])
PARAMS = {"name": NAME}


def _doc(ps: db.ProcessServer, now: float, machines: int,
         events: Sequence[db.Event]) -> dict[str, Any]:
    mine = [e for e in events if e.target == ps.name]
    health = "critical" if any(e.severity == "critical" for e in mine) else \
        "warning" if mine else "normal"
    return {
        "name": ps.name, "address": ps.address, "version": ps.version,
        "registered_at": iso(ps.registered_at), "last_contact": iso(ps.last_contact),
        "seconds_since_contact": round(max(0.0, now - ps.last_contact), 1),
        "cache_bytes": ps.cache_bytes, "cache_free_ratio": ps.cache_free_ratio,
        "backlog_bytes": ps.backlog_bytes, "backlog_seconds": ps.backlog_seconds,
        "throughput_bps": ps.throughput_bps, "sessions": ps.sessions,
        "storage_failing_seconds": 0.0 if ps.storage_failing_since is None
        else round(max(0.0, now - ps.storage_failing_since), 1),
        "storage_error": ps.storage_error,
        "refresh_requested": ps.refresh_requested, "machines": machines, "health": health,
        "alerts": [{"code": e.code, "severity": e.severity, "message": e.message,
                    "since": iso(e.time)} for e in mine],
    }


async def _docs(call: Call, name: str | None = None) -> list[dict[str, Any]]:
    q = select(db.ProcessServer).order_by(db.ProcessServer.name)
    counts_q = select(db.Machine.process_server, func.count()).group_by(
        db.Machine.process_server)
    events_q = select(db.Event).where(db.Event.active.is_(True),
                                      db.Event.code.in_(alerts.PROCSERVER_CODES))
    if name is not None:
        q = q.where(db.ProcessServer.name == name)
        counts_q = counts_q.where(db.Machine.process_server == name)
        events_q = events_q.where(db.Event.target == name)
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(q)).scalars().all()
        counts = {k: int(v) for k, v in (await s.execute(counts_q)).all()}
        events = (await s.execute(events_q.order_by(db.Event.id))).scalars().all()
    now = call.services.clock()
    return [_doc(r, now, counts.get(r.name, 0), events) for r in rows]


async def _one(call: Call) -> dict[str, Any]:
    docs = await _docs(call, call.params["name"])
    if not docs:
        raise not_found("procserver", call.params["name"],
                        "a process server registers with its first heartbeat: is it running "
                        "with configserver_url set? see GET /api/v1/procservers")
    return docs[0]


async def heartbeat(call: Call) -> web.Response:
    b: dict[str, Any] = call.body
    for k in ("cache_free_ratio", "backlog_seconds", "throughput_bps",
              "storage_failing_seconds"):
        if not math.isfinite(b.get(k, 0.0)):
            raise ApiError(422, "invalid_request", f"{k}: must be a finite number")
    svc = call.services
    fields = {k: b[k] for k in ("address", "version", "cache_bytes", "cache_free_ratio",
                                "backlog_bytes", "backlog_seconds", "throughput_bps",
                                "sessions")}
    for attempt in (1, 2):
        now = svc.clock()
        try:
            async with svc.sessionmaker() as s:
                row = await s.get(db.ProcessServer, b["name"], with_for_update=True)
                first = row is None
                if row is None:
                    row = db.ProcessServer(name=b["name"], registered_at=now,
                                           refresh_requested=False)
                    s.add(row)
                for k, v in fields.items():
                    setattr(row, k, v)
                row.last_contact = now
                row.pending_cycles = b.get("pending_cycles")
                failing = float(b.get("storage_failing_seconds") or 0.0)
                row.storage_failing_since = now - failing if failing > 0 or b.get(
                    "storage_error") else None
                row.storage_error = b.get("storage_error") if row.storage_failing_since \
                    is not None else None
                row.heartbeats = (row.heartbeats or 0) + 1
                refresh = bool(row.refresh_requested)
                row.refresh_requested = False
                await s.commit()
            break
        except IntegrityError:
            if attempt == 2:  # a concurrent first heartbeat inserted it: update that row
                raise
    svc.metrics.ps_heartbeats.labels(b["name"]).inc()
    if first:
        log.info("procserver_registered", procserver=b["name"], address=b["address"],
                 version=b["version"])
    if refresh:
        log.info("procserver_refresh_delivered", procserver=b["name"])
    await alerts.evaluate(svc, svc.alert_book)
    await svc.notify()
    return reply({"refresh_requested": refresh})


async def list_procservers(call: Call) -> web.Response:
    return reply({"procservers": await _docs(call)})


async def get_procserver(call: Call) -> web.Response:
    return reply(await _one(call))


async def refresh_procserver(call: Call) -> web.Response:
    name = call.params["name"]
    async with call.services.sessionmaker() as s:
        row = await s.get(db.ProcessServer, name, with_for_update=True)
        if row is not None:
            row.refresh_requested = True
            await s.commit()
    doc = await _one(call)
    log.info("procserver_refresh_requested", procserver=name)
    return reply(doc, status=202)


async def delete_procserver(call: Call) -> web.Response:
    name = call.params["name"]
    async with call.services.sessionmaker() as s:
        row = await s.get(db.ProcessServer, name, with_for_update=True)
        if row is None:
            raise not_found("procserver", name, "see GET /api/v1/procservers")
        machines = (await s.execute(select(db.Machine.name).where(
            db.Machine.process_server == name).order_by(db.Machine.name))).scalars().all()
        if machines:
            shown = ", ".join(machines[:10]) + (" …" if len(machines) > 10 else "")
            raise ApiError(409, "procserver_in_use",
                           f"process server {name!r} has {len(machines)} machine(s) assigned: "
                           f"{shown}",
                           "assign them to another process server first (PATCH "
                           "/api/v1/machines/{name} with process_server)")
        await s.delete(row)
        await s.commit()
    log.info("procserver_removed", procserver=name)
    # its alerts clear, its metrics go
    await alerts.evaluate(call.services, call.services.alert_book)
    return web.Response(status=204)


ITEM_POLICY = obj({
    "machine": {"type": "string"},
    "policy": obj({"name": {"type": "string"},
                   **{k: {"type": "integer"} for k in POLICY_FIELDS}},
                  ["name", *POLICY_FIELDS]),
}, ["machine", "policy"])


async def item_policies(call: Call) -> web.Response:
    """The policy of every replicated item whose machine is assigned to this process
    server (items not yet assigned, during their Prerequisites check, are not listed)."""
    name = call.params["name"]
    async with call.services.sessionmaker() as s:
        if await s.get(db.ProcessServer, name) is None:
            raise not_found("procserver", name, "a process server registers with its first "
                            "heartbeat: is its name the one it heartbeats with?")
        rows = (await s.execute(
            select(db.ReplicatedItem.machine, db.Policy)
            .join(db.Machine, db.Machine.name == db.ReplicatedItem.machine)
            .join(db.Policy, db.Policy.name == db.ReplicatedItem.policy)
            .where(db.Machine.process_server == name)
            .order_by(db.ReplicatedItem.machine))).all()
    return reply({"items": [
        {"machine": machine, "policy": {"name": policy.name, **{
            k: int(getattr(policy, c)) for k, c in COLUMNS.items()}}}
        for machine, policy in rows]})


ROUTES = [
    Route("GET", "/api/v1/internal/procservers/{name}/policies", item_policies,
          "The policies a process server applies (process servers)", "procservers",
          auth="internal", params=PARAMS, listeners=("admin", "site"),
          responses={200: obj({"items": array(ITEM_POLICY)}, ["items"]), 404: ERROR_SCHEMA},
          description="One entry per replicated item whose machine is assigned to the "
                      "process server, with its policy's fields. The process server forgets "
                      "a machine's recovery points older than retention_hours and shows "
                      "rpo_threshold_seconds in its metrics. 404 for a name that never "
                      "heartbeated."),
    Route("POST", "/api/v1/internal/procservers/heartbeat", heartbeat,
          "Register or heartbeat a process server (process servers)", "procservers",
          auth="internal", body=HEARTBEAT, listeners=("admin", "site"),
          responses={200: obj({"refresh_requested": {"type": "boolean"}},
                              ["refresh_requested"])},
          description="The first heartbeat of a name registers it. The answer says whether "
                      "a refresh was requested since the last heartbeat (the flag is then "
                      "cleared): the process server re-pulls its settings and heartbeats "
                      "again at once. Alerts are evaluated after every heartbeat."),
    Route("GET", "/api/v1/procservers", list_procservers, "List process servers and their "
          "health", "procservers",
          responses={200: obj({"procservers": array(PROCSERVER)}, ["procservers"])}),
    Route("GET", "/api/v1/procservers/{name}", get_procserver, "Show a process server",
          "procservers", params=PARAMS, responses={200: PROCSERVER}),
    Route("POST", "/api/v1/procservers/{name}/refresh", refresh_procserver,
          "Ask a process server to refresh", "procservers", params=PARAMS,
          responses={202: PROCSERVER},
          description="Sets a flag its next heartbeat answers with; the process server then "
                      "re-pulls its settings and heartbeats again at once. 202: the refresh "
                      "happens at the next heartbeat (refresh_requested turns false)."),
    Route("DELETE", "/api/v1/procservers/{name}", delete_procserver,
          "Remove a process server", "procservers", params=PARAMS, responses={204: None},
          description="Refused (409) while machines are assigned to it. Its alerts are "
                      "cleared. A process server still running registers again with its "
                      "next heartbeat: stop it first."),
]
