"""The admin REST API (loopback, bearer token) and the internal API for process servers."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import select

from configserver import db
from configserver.tokens import matches

if TYPE_CHECKING:
    from configserver.server import ConfigServer

log = structlog.get_logger("configserver.api")
_MACHINE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, code: str, message: str, hint: str = "") -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "hint": hint}},
                             status=status)


class Api:
    def __init__(self, server: ConfigServer) -> None:
        self.server = server

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=1 << 20)
        r = app.router
        r.add_get("/healthz", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/v1/points", self.list_points)
        r.add_post("/api/v1/internal/points", self.report_point)
        r.add_post("/api/v1/certificates/agent", self.issue_agent_cert)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in ("/healthz", "/metrics"):
            return await handler(request)
        token = (self.server.internal_token if path.startswith("/api/v1/internal/")
                 else self.server.admin_token)
        if not matches(request.headers.get("Authorization"), token):
            return error(401, "unauthorized", "missing or wrong bearer token",
                         f"send 'Authorization: Bearer <token>' from "
                         f"{self.server.cfg.token_path}")
        try:
            return await handler(request)
        except web.HTTPException as e:
            return error(e.status, e.reason.lower().replace(" ", "_"), e.text or e.reason)

    async def health(self, _r: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, _r: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.server.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_points(self, request: web.Request) -> web.Response:
        machine = request.query.get("machine")
        q = select(db.RecoveryPoint).order_by(db.RecoveryPoint.created)
        if machine:
            q = q.where(db.RecoveryPoint.machine == machine)
        async with self.server.sessionmaker() as s:
            rows = (await s.execute(q)).scalars().all()
        return web.json_response({"points": [
            {"id": r.id, "machine": r.machine, "created": r.created,
             "consistency": r.consistency} for r in rows]})

    async def report_point(self, request: web.Request) -> web.Response:
        try:
            doc: dict[str, Any] = await request.json()
            pid, machine = str(doc["id"]), str(doc["machine"])
            created, consistency = str(doc["created"]), str(doc["consistency"])
        except (ValueError, KeyError, TypeError):
            return error(400, "bad_point", "body must be a recovery-point manifest")
        async with self.server.sessionmaker() as s:
            if await s.get(db.RecoveryPoint, pid) is None:
                s.add(db.RecoveryPoint(id=pid, machine=machine, created=created,
                                       consistency=consistency, doc=json.dumps(doc),
                                       received=time.time()))
                await s.commit()
                self.server.metrics.points.inc()
        log.info("point_recorded", point=pid, machine=machine, consistency=consistency)
        return web.json_response({"id": pid}, status=201)

    async def issue_agent_cert(self, request: web.Request) -> web.Response:
        try:
            machine = (await request.json())["machine"]
        except (ValueError, KeyError, TypeError):
            return error(400, "bad_request", "body must be {\"machine\": NAME}")
        if not isinstance(machine, str) or not _MACHINE.match(machine):
            return error(400, "bad_machine_name",
                         "machine names are 1-63 characters of [A-Za-z0-9_.-]")
        issued = self.server.ca.issue_client(machine)
        log.info("agent_certificate_issued", machine=machine)
        return web.json_response({"machine": machine, "cert": issued.cert_pem.decode(),
                                  "key": issued.key_pem.decode(),
                                  "ca": self.server.ca.cert_pem.decode()}, status=201)
