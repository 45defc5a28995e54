"""What the console shows, read through the REST API's own handlers.

Each page asks the handler of the matching ``GET /api/v1/...`` route for its document,
so the console shows exactly what the API and the CLI show (the same queries, the same
health and RPO rules) and cannot drift from them. Domain errors pass through
(``NotFound`` for an unknown item), as they do to the REST layer.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from configserver import (
    api_events,
    api_items,
    api_jobs,
    api_machines,
    api_points,
    api_policies,
    api_procservers,
    api_registration,
    verifyjob,
)
from configserver.rest import Call, Handler
from configserver.services import Services


class Reader:
    """The API documents for one console request."""

    def __init__(self, request: web.Request, services: Services) -> None:
        self.request, self.services = request, services

    async def _get(self, handler: Handler, query: dict[str, Any] | None = None,
                   params: dict[str, str] | None = None) -> Any:
        resp = await handler(Call(self.request, self.services, None, query or {},
                                  params or {}))
        assert isinstance(resp, web.Response)
        return json.loads(resp.text or "null")

    async def items(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = (await self._get(api_items.list_items))["items"]
        return docs

    async def unreplicated(self) -> list[str]:
        """The enabled machines of the inventory that are not replicated (or whose enabling
        failed): what replication can be enabled for."""
        docs = (await self._get(api_machines.list_machines))["machines"]
        return [m["name"] for m in docs
                if m["enabled"] and m["replication"] in (None, "enable_failed")]

    async def policies(self) -> list[str]:
        return [p["name"] for p in (await self._get(api_policies.list_policies))["policies"]]

    async def item(self, machine: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._get(api_items.show_item,
                                              params={"machine": machine})
        return doc

    async def points(self, machine: str) -> list[dict[str, Any]]:
        """The item's recovery points, newest first."""
        docs: list[dict[str, Any]] = (await self._get(api_points.list_points,
                                                      {"machine": machine}))["points"]
        return docs[::-1]

    async def jobs(self, target: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"limit": limit}
        if target is not None:
            query["target"] = target
        docs: list[dict[str, Any]] = (await self._get(api_jobs.list_jobs, query))["jobs"]
        return docs

    async def job(self, jid: str) -> dict[str, Any]:
        doc: dict[str, Any] = await self._get(api_jobs.show_job, params={"id": jid})
        return doc

    async def registered(self) -> bool:
        """Whether this server is registered with a vault (it recovers nothing before)."""
        return bool((await self._get(api_registration.show_registration))["registered"])

    async def active_alerts(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = (await self._get(api_events.list_events,
                                                      {"active": True}))["events"]
        return docs

    async def alerts(self, cleared: int = 100) -> list[dict[str, Any]]:
        """Active alerts (newest first), then up to ``cleared`` cleared ones."""
        active = await self.active_alerts()
        old = (await self._get(api_events.list_events, {"active": False,
                                                         "limit": cleared}))["events"]
        return [*active, *old]

    async def procservers(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = (await self._get(api_procservers.list_procservers)
                                      )["procservers"]
        return docs

    async def verification(self, machine: str | None = None
                           ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """The last verification (``point``, ``ok``, ``verified``, ``damaged``) of each
        point, by point id, and of each machine, by machine name."""
        status = await verifyjob.status(self.services, machine)
        by_point: dict[str, dict[str, Any]] = {}
        by_machine: dict[str, dict[str, Any]] = {}
        for v in status["points"]:  # newest first
            by_point.setdefault(v["point"], v)
            by_machine.setdefault(v["machine"], v)
        return by_point, by_machine
