"""The console's pages of recovery plans and consistency groups (GET): the plans, one
plan, the groups, one group. A plan's or group's page shows the forms its items' states
allow (``recoverydata.offered``: what the plan layer would accept now; the actions are in
``planactions.py``), its items by state, why a verb some items could take is not offered
(``recoverydata.withheld``: a plan partly failed over is committed only once every item
is failed over) and, for a plan job waiting at a manual action, the form that confirms it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from configserver import groups, plans
from configserver.console.app import console_of
from configserver.console.data import Reader
from configserver.console.recoverydata import (
    DESTRUCTIVE,
    RecoveryReader,
    by_state,
    offered,
    waiting,
    withheld,
)
from configserver.errors import NotFound
from configserver.jobs import ACTIVE

REFRESH_LIST, REFRESH_MOVING = 15, 3  # seconds, as the items' pages


def _reader(request: web.Request) -> RecoveryReader:
    services = console_of(request).services
    return RecoveryReader(Reader(request, services), services)


def _moving(jobs: list[dict[str, Any]]) -> bool:
    return any(j["state"] in ACTIVE for j in jobs)


async def _typed(request: web.Request, error: str) -> Mapping[str, Any]:
    """What the refused form held (shown again in it), or nothing."""
    return await request.post() if error else {}


def _missing(request: web.Request, nav: str, e: NotFound) -> web.Response:
    return console_of(request).page(request, "missing.html", 404, title="Not found",
                                    nav=nav, message=e.message, hint=e.hint)


async def plans_page(request: web.Request, *, error: str = "", status: int = 200
                     ) -> web.Response:
    """The plans, and the form that creates one; ``error`` is its refusal, shown above
    it with what was typed."""
    r = _reader(request)
    docs = await r.plans()
    moving = any(p["last_job"] and p["last_job"]["state"] in ACTIVE for p in docs)
    typed = await _typed(request, error)
    return console_of(request).page(
        request, "plans.html", status, title="Recovery plans", nav="plans", plans=docs,
        items=await r.items(), error=error, typed=typed,
        refresh=0 if error else REFRESH_MOVING if moving else REFRESH_LIST)


async def plan_page(request: web.Request, *, error: str = "", status: int = 200
                    ) -> web.Response:
    """One plan: its groups in order with their items' states, its jobs, the forms its
    items' states allow; ``error`` is an action's refusal, shown above the forms."""
    r, name = _reader(request), request.match_info["name"]
    try:
        plan = await r.plan(name)
    except NotFound as e:
        return _missing(request, "plans", e)
    items = await r.items()
    jobs = await r.jobs(plans.job_target(name))
    verdicts = await r.verdicts(plan["groups"], plans.job_target(name))
    machines = [m for g in plan["groups"] for m in g["items"]]
    typed = await _typed(request, error)
    return console_of(request).page(
        request, "plan.html", status, title=f"Plan {name}", nav="plans", plan=plan,
        items=items, jobs=jobs, actions=offered(verdicts, jobs), verdicts=verdicts,
        withheld=withheld(verdicts, jobs), by_state=by_state(machines, items),
        waiting=waiting(jobs), destructive=DESTRUCTIVE, error=error, typed=typed,
        lines="\n".join(", ".join(g["items"]) for g in plan["groups"]),
        refresh=REFRESH_MOVING if _moving(jobs) and not error else 0)


async def groups_page(request: web.Request, *, error: str = "", status: int = 200
                      ) -> web.Response:
    """The groups, and the form that creates one; ``error`` is its refusal, shown above
    it with what was typed."""
    r = _reader(request)
    docs = await r.groups()
    last = {g["name"]: next(iter(await r.group_points(g["name"], 1)), None) for g in docs}
    moving = any(g["last_job"] and g["last_job"]["state"] in ACTIVE for g in docs)
    typed = await _typed(request, error)
    return console_of(request).page(
        request, "groups.html", status, title="Consistency groups", nav="groups",
        groups=docs, last_points=last, items=await r.items(), error=error, typed=typed,
        refresh=0 if error else REFRESH_MOVING if moving else REFRESH_LIST)


async def group_page(request: web.Request, *, error: str = "", status: int = 200
                     ) -> web.Response:
    """One group: its members' states, its newest group points, its jobs and the forms
    its members' states allow (a drill or failover to a complete group point)."""
    r, name = _reader(request), request.match_info["name"]
    try:
        group = await r.group(name)
    except NotFound as e:
        return _missing(request, "groups", e)
    items = await r.items()
    jobs = await r.jobs(groups.job_target(name))
    points = await r.group_points(name)
    verdicts = await r.verdicts([{"items": group["members"]}], groups.job_target(name))
    typed = await _typed(request, error)
    return console_of(request).page(
        request, "group.html", status, title=f"Group {name}", nav="groups", group=group,
        items=items, jobs=jobs, points=points,
        complete=[p for p in points if p["state"] == "complete"],
        actions=offered(verdicts, jobs), verdicts=verdicts,
        withheld=withheld(verdicts, jobs), by_state=by_state(group["members"], items),
        destructive=DESTRUCTIVE, error=error, typed=typed,
        refresh=REFRESH_MOVING if _moving(jobs) and not error else 0)


ROUTES = [
    web.get("/plans", plans_page),
    web.get("/plans/{name}", plan_page),
    web.get("/groups", groups_page),
    web.get("/groups/{name}", group_page),
]
