"""The console's pages (GET): items, one item, alerts, jobs, one job, process servers.

Pages reload themselves every few seconds (``refresh``; sooner while an item or a job
is in motion) through ``static/refresh.js``, which the operator can pause; without
JavaScript they read the same and are reloaded by hand. (A ``<meta http-equiv=refresh>``
could not be paused: WCAG 2.2.1, which axe-core reports as critical.)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from configserver.console.app import console_of
from configserver.console.chart import rpo_chart
from configserver.console.data import Reader
from configserver.console.recoverydata import waiting
from configserver.errors import NotFound
from configserver.items import HEALTHS, ItemState
from configserver.jobs import ACTIVE
from configserver.rest import ApiError

# States an item leaves by itself: its page reloads to show where it went.
MOVING = (ItemState.ENABLING, ItemState.INITIAL_REPLICATION, ItemState.RESYNC_REQUIRED,
          ItemState.RESYNCING, ItemState.DISABLING, ItemState.TEST_FAILOVER_IN_PROGRESS,
          ItemState.FAILOVER_IN_PROGRESS)
REFRESH_ITEMS, REFRESH_MOVING = 15, 3  # seconds
# The newest points an item's page lists and offers to recover (a day of points a minute
# apart would be 1440); older ones are reached by id with the CLI.
POINTS_SHOWN = 200
# What each state lets the operator do from the item's page (the server checks again).
ACTIONS: dict[str, tuple[str, ...]] = {
    ItemState.PROTECTED: ("test-failover", "failover", "resync", "disable"),
    ItemState.RESYNC_REQUIRED: ("failover", "disable"),
    ItemState.RESYNCING: ("failover", "disable"),
    ItemState.TEST_FAILOVER_DONE: ("cleanup-test-failover",),
    ItemState.FAILED_OVER: ("change-recovery-point", "commit"),
    ItemState.ENABLE_FAILED: ("disable",),
    ItemState.ENABLING: ("disable",),
    ItemState.INITIAL_REPLICATION: ("disable",),
}


def rpo_status(item: dict[str, Any]) -> str:
    """``ok``, ``over`` (the RPO exceeds the policy's threshold) or ``none`` (no point)."""
    rpo, limit = item.get("rpo_seconds"), item.get("rpo_threshold_seconds")
    if rpo is None:
        return "none"
    return "over" if limit is not None and rpo > limit else "ok"


async def items_page(request: web.Request, *, error: str = "", status: int = 200
                     ) -> web.Response:
    """Every item; the form to enable replication of a machine (``error``: its refusal)."""
    console = console_of(request)
    reader = Reader(request, console.services)
    items = await reader.items()
    _, verified = await reader.verification()
    alerts = await reader.active_alerts()
    health = {h: sum(1 for i in items if i["health"] == h) for h in HEALTHS}
    return console.page(request, "items.html", status, title="Replicated items", nav="items",
                        items=items, verified=verified, rpo_status=rpo_status,
                        health=health, alerts=alerts, registered=await reader.registered(),
                        machines=await reader.unreplicated(), policies=await reader.policies(),
                        error=error, refresh=0 if error else REFRESH_ITEMS)


async def item_page(request: web.Request, *, error: str = "", status: int = 200
                    ) -> web.Response:
    """One item: its summary, recovery points, jobs and the actions its state allows;
    ``error`` is an action's refusal, shown above the forms."""
    console = console_of(request)
    reader = Reader(request, console.services)
    machine = request.match_info["machine"]
    try:
        item = await reader.item(machine)
    except NotFound as e:
        return console.page(request, "missing.html", 404, title="Not found", nav="items",
                            message=e.message, hint=e.hint)
    points = await reader.points(machine)
    by_point, by_machine = await reader.verification(machine)
    jobs = await reader.jobs(target=machine, limit=20)
    moving = item["state"] in MOVING or any(j["state"] in ACTIVE for j in jobs)
    return console.page(request, "item.html", status, title=machine, nav="items",
                        item=item, points=points[:POINTS_SHOWN], points_total=len(points),
                        verified=by_point, last_verified=by_machine.get(machine), jobs=jobs,
                        chart=rpo_chart(points, console.services.clock(),
                                        item["rpo_threshold_seconds"]),
                        actions=ACTIONS.get(item["state"], ()), error=error,
                        rpo_status=rpo_status, refresh=REFRESH_MOVING if moving else 0)


async def alerts_page(request: web.Request) -> web.Response:
    console = console_of(request)
    events = await Reader(request, console.services).alerts()
    return console.page(request, "alerts.html", title="Alerts", nav="alerts",
                        events=events, refresh=REFRESH_ITEMS)


async def jobs_page(request: web.Request) -> web.Response:
    console = console_of(request)
    jobs = await Reader(request, console.services).jobs(limit=100)
    moving = any(j["state"] in ACTIVE for j in jobs)
    return console.page(request, "jobs.html", title="Jobs", nav="jobs", jobs=jobs,
                        refresh=REFRESH_MOVING if moving else REFRESH_ITEMS)


async def job_page(request: web.Request, *, error: str = "", status: int = 200
                   ) -> web.Response:
    """One job and its steps; ``error`` is a refused cancel, shown above them."""
    console = console_of(request)
    try:
        job = await Reader(request, console.services).job(request.match_info["id"])
    except ApiError as e:
        if e.status != 404:
            raise
        return console.page(request, "missing.html", 404, title="Not found", nav="jobs",
                            message=e.message, hint="see the list of jobs")
    # a plan job waiting at a manual action is confirmed from here too (planactions.py)
    plan = job["target"][5:] if job["target"].startswith("plan:") else None
    return console.page(request, "job.html", status, title=job["title"], nav="jobs",
                        job=job, plan=plan, waiting=waiting([job]) if plan else None,
                        error=error, refresh=0 if error else
                        REFRESH_MOVING if job["state"] in ACTIVE else 0)


async def procservers_page(request: web.Request) -> web.Response:
    console = console_of(request)
    servers = await Reader(request, console.services).procservers()
    return console.page(request, "procservers.html", title="Process servers",
                        nav="procservers", servers=servers, refresh=REFRESH_ITEMS)


ROUTES = [
    web.get("/", items_page),
    web.get("/items/{machine}", item_page),
    web.get("/alerts", alerts_page),
    web.get("/jobs", jobs_page),
    web.get("/jobs/{id}", job_page),
    web.get("/procservers", procservers_page),
]
