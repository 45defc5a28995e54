"""The console's actions on recovery plans and consistency groups (POST forms, each with
the session's CSRF token; ``app.guard`` checks it and the form's origin).

They call what the REST routes call: ``plans.create`` and ``groups.create`` (``POST
/api/v1/plans|groups``, the body checked against the route's schema), ``groups.add`` and
``groups.remove`` (a group's members), ``plans.update`` (``PATCH``: a plan's
description and items), ``plans.delete`` and ``groups.remove_group``,
``planops.request`` (``POST /api/v1/plans/{name}/<verb>``), ``groupops.request``
(``POST /api/v1/groups/{name}/<verb>``) and ``planops.resume`` (``POST
/api/v1/jobs/{id}/resume``). A refusal (``DomainError``) is shown on the plan's or
group's page with its message and hint, with the status the API would answer.
Failover, commit, failback and a delete go ahead only when the form's ``confirm`` field
is the plan's or group's name, typed by the operator.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from jsonschema import Draft202012Validator
from multidict import MultiDictProxy

from configserver import db, groupops, groups, planops, plans
from configserver.console.app import PREFIX, console_of, see_other
from configserver.console.planpages import group_page, groups_page, plan_page, plans_page
from configserver.console.recoverydata import DESTRUCTIVE, VERBS
from configserver.errors import DomainError, InvalidRequest, NotFound
from configserver.rest import status_of

log = structlog.get_logger("configserver.console")

Form = MultiDictProxy[Any]
Page = Callable[..., Awaitable[web.Response]]
# The points a plan's drill or failover may name (each item's own: a point id is one
# item's, so a plan names none); a group names one of its group points instead.
PLAN_POINTS = {"test-failover": ("latest-processed", "latest-app-consistent"),
               "failover": ("latest-processed", "latest", "latest-app-consistent")}
GROUP_POINT = re.compile(r"[0-9a-f]{32}")
_CREATE_PLAN = Draft202012Validator(plans.CREATE)
_CREATE_GROUP = Draft202012Validator(groups.CREATE)
_ADD_MEMBERS = Draft202012Validator(groups.MEMBERS_BODY)
_UPDATE_PLAN = Draft202012Validator(plans.UPDATE)
MAX_NOTES = 4000


def _text(form: Form, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _plan_body(verb: str, form: Form) -> dict[str, Any]:
    """The REST body of a plan verb from its form's fields."""
    body: dict[str, Any] = {}
    if verb in PLAN_POINTS:
        point = _text(form, "point") or PLAN_POINTS[verb][0]
        if point not in PLAN_POINTS[verb]:
            raise InvalidRequest("point_invalid", f"a plan's {verb} takes one of "
                                 f"{', '.join(PLAN_POINTS[verb])}, not {point[:80]!r}",
                                 "choose the point from the list")
        body["point"] = point
    if verb == "failover" and _text(form, "shutdown_source") == "yes":
        body["shutdown_source"] = True
    if verb == "cleanup-test-failover":
        body["notes"] = _text(form, "notes")[:MAX_NOTES]
    return body


def _group_body(verb: str, form: Form) -> dict[str, Any]:
    """The REST body of a group verb from its form's fields."""
    body: dict[str, Any] = {}
    if verb in groupops.AT_POINT and (gp := _text(form, "group_point")):
        if not GROUP_POINT.fullmatch(gp):
            raise InvalidRequest("group_point_invalid", f"{gp[:80]!r} is not a group "
                                 "point's id", "choose a complete group point from the list")
        body["group_point"] = gp
    if verb == "cleanup-test-failover":
        body["notes"] = _text(form, "notes")[:MAX_NOTES]
    return body


def _refused(page: Page, request: web.Request, e: DomainError, **what: str
             ) -> Awaitable[web.Response]:
    log.info("console_action_refused", code=e.code, **what)
    return page(request, status=status_of(e),
                error=f"{e.message}. {e.hint}" if e.hint else e.message)


async def _verb(request: web.Request, kind: str, page: Page) -> web.Response:
    console = console_of(request)
    svc = console.services
    name, verb = request.match_info["name"], request.match_info["verb"]
    if verb not in VERBS:
        return console.page(request, "missing.html", 404, title="Not found", nav=kind,
                            message=f"no action {verb!r}", hint="use the page's forms")
    form = await request.post()  # the guard checked its CSRF token
    if verb in DESTRUCTIVE and _text(form, "confirm") != name:
        return await page(request, status=422, error=(
            f"{verb}: type the name, {name}, in the confirmation box to go on"))
    try:
        if kind == "plans":
            job = await planops.request(svc, svc.jobs.kinds, verb, name,
                                        _plan_body(verb, form))
        else:
            job, _ = await groupops.request(svc, svc.jobs.kinds, verb, name,
                                            _group_body(verb, form))
    except DomainError as e:
        return await _refused(page, request, e, verb=verb, target=f"{kind}/{name}")
    await svc.notify()
    log.info("console_action", verb=verb, target=f"{kind}/{name}", job=job.id)
    return see_other(f"{PREFIX}/{kind}/{name}")


async def plan_verb(request: web.Request) -> web.Response:
    return await _verb(request, "plans", plan_page)


async def group_verb(request: web.Request) -> web.Response:
    return await _verb(request, "groups", group_page)


async def plan_resume(request: web.Request) -> web.Response:
    """Confirm the manual action a job of the plan waits at."""
    console = console_of(request)
    svc = console.services
    name = request.match_info["name"]
    form = await request.post()  # the guard checked its CSRF token
    jid = _text(form, "job")
    try:
        async with svc.sessionmaker() as s:  # a job of this plan only
            job = await s.get(db.Job, jid) if jid else None
        if job is None or job.target != plans.job_target(name):
            raise NotFound("job_not_found", f"plan {name!r} has no job {jid[:80]!r}",
                           "confirm from the plan's page")
        await planops.resume(svc, jid, _text(form, "notes")[:MAX_NOTES])
    except DomainError as e:
        return await _refused(page=plan_page, request=request, e=e, verb="resume",
                              target=f"plans/{name}")
    await svc.notify()
    log.info("console_action", verb="resume", target=f"plans/{name}", job=jid)
    return see_other(f"{PREFIX}/plans/{name}")


async def plan_create(request: web.Request) -> web.Response:
    """Create a recovery plan (``POST /api/v1/plans``): its name, its groups one per line
    (the items of a line, in the order they are recovered with the line before first),
    a description. Scripts and manual actions are the CLI's and the API's."""
    form = await request.post()  # the guard checked its CSRF token
    body: dict[str, Any] = {"name": _text(form, "name"), "groups": [
        {"items": items} for line in _text(form, "groups").splitlines()
        if (items := _names(line))]}
    if description := _text(form, "description"):
        body["description"] = description
    return await _create(request, "plans", body, _CREATE_PLAN, plans.create, plans_page,
                         "a name of letters, digits, '.', '_' or '-'; one group per line, "
                         "each the names of replicated items")


async def group_create(request: web.Request) -> web.Response:
    """Create a consistency group (``POST /api/v1/groups``): its name and members, with
    the default barrier timeout and interval (the CLI and the API set those)."""
    form = await request.post()  # the guard checked its CSRF token
    body = {"name": _text(form, "name"), "members": _names(_text(form, "members"))}
    return await _create(request, "groups", body, _CREATE_GROUP, groups.create,
                         groups_page, "a name of letters, digits, '.', '_' or '-'; the "
                         "members: names of replicated machines")


async def group_members(request: web.Request) -> web.Response:
    """Add machines to a group (``POST /api/v1/groups/{name}/members``), or remove the one
    the form names (``DELETE /api/v1/groups/{name}/members/{machine}``), as their REST
    routes do; a refusal is shown on the group's page, with what was typed."""
    svc = console_of(request).services
    name, op = request.match_info["name"], request.match_info["op"]
    form = await request.post()  # the guard checked its CSRF token
    try:
        if op == "add":
            body = {"machines": _names(_text(form, "machines"))}
            _check(_ADD_MEMBERS, body, "group_invalid", "the names of replicated machines "
                   "of the group's process server, separated by spaces or commas")
            await groups.add(svc, name, body["machines"])
        else:
            await groups.remove(svc, name, _text(form, "machine"))
    except DomainError as e:
        return await _refused(group_page, request, e, verb=f"members {op}",
                              target=f"groups/{name}")
    await svc.notify()
    log.info("console_action", verb=f"members {op}", target=f"groups/{name}")
    return see_other(f"{PREFIX}/groups/{name}")


async def plan_edit(request: web.Request) -> web.Response:
    """Change a plan's description and its groups' items (``PATCH /api/v1/plans/{name}``):
    the items of a group a line, in the order the groups run. A line keeps the name,
    scripts and manual actions of the group at its place; a line past the last group is
    a new group; groups past the last line go, with their scripts and actions."""
    svc = console_of(request).services
    name = request.match_info["name"]
    form = await request.post()  # the guard checked its CSRF token
    lines = [items for line in _text(form, "groups").splitlines() if (items := _names(line))]
    try:
        stored = (await plans.get(svc, name))["groups"]
        body = {"description": _text(form, "description"), "groups": [
            {**(stored[n] if n < len(stored) else {}), "items": items}
            for n, items in enumerate(lines)]}
        _check(_UPDATE_PLAN, body, "plan_invalid", "one group per line, each the names of "
               "replicated items; a description of at most 1000 characters")
        await plans.update(svc, name, body)
    except DomainError as e:
        return await _refused(plan_page, request, e, verb="edit", target=f"plans/{name}")
    await svc.notify()
    log.info("console_action", verb="edit", target=f"plans/{name}")
    return see_other(f"{PREFIX}/plans/{name}")


async def plan_delete(request: web.Request) -> web.Response:
    """Delete a plan (``DELETE /api/v1/plans/{name}``: refused while a job of it runs),
    its name typed to confirm."""
    return await _delete(request, "plans", plans.delete, plan_page)


async def group_delete(request: web.Request) -> web.Response:
    """Delete a group (``DELETE /api/v1/groups/{name}``: its group points go, the
    members' own points stay), its name typed to confirm."""
    return await _delete(request, "groups", groups.remove_group, group_page)


async def _delete(request: web.Request, kind: str,
                  remove: Callable[[Any, str], Awaitable[None]], page: Page) -> web.Response:
    svc = console_of(request).services
    name = request.match_info["name"]
    form = await request.post()  # the guard checked its CSRF token
    if _text(form, "confirm") != name:
        return await page(request, status=422, error=(
            f"delete: type the name, {name}, in the confirmation box to go on"))
    try:
        await remove(svc, name)
    except DomainError as e:
        return await _refused(page, request, e, verb="delete", target=f"{kind}/{name}")
    await svc.notify()
    log.info("console_action", verb="delete", target=f"{kind}/{name}")
    return see_other(f"{PREFIX}/{kind}")


def _names(text: str) -> list[str]:
    return [n for n in re.split(r"[\s,]+", text) if n]


async def _create(request: web.Request, kind: str, body: dict[str, Any],
                  schema: Draft202012Validator,
                  create: Callable[[Any, dict[str, Any]], Awaitable[object]], page: Page,
                  hint: str) -> web.Response:
    """Check ``body`` as the REST route would, create it, and show it (or the refusal,
    on ``page`` with what was typed)."""
    svc = console_of(request).services
    try:
        _check(schema, body, f"{kind[:-1]}_invalid", hint)
        await create(svc, body)
    except DomainError as e:
        return await _refused(page, request, e, verb="create", target=kind)
    await svc.notify()
    log.info("console_action", verb="create", target=f"{kind}/{body['name']}")
    return see_other(f"{PREFIX}/{kind}/{body['name']}")


def _check(schema: Draft202012Validator, body: dict[str, Any], code: str,
           hint: str) -> None:
    """``InvalidRequest`` naming the first field the REST route's schema would refuse."""
    problem = next(iter(sorted(schema.iter_errors(body), key=lambda e: list(e.path))), None)
    if problem is not None:
        where = ".".join(str(p) for p in problem.path) or "the form"
        raise InvalidRequest(code, f"{where}: {problem.message[:200]}", hint)


ROUTES = [
    web.post("/plans", plan_create),
    web.post("/groups", group_create),
    web.post("/plans/{name}/resume", plan_resume),
    web.post("/groups/{name}/members/{op:add|remove}", group_members),
    web.post("/plans/{name}/edit", plan_edit),
    web.post("/plans/{name}/delete", plan_delete),
    web.post("/groups/{name}/delete", group_delete),
    web.post("/plans/{name}/{verb}", plan_verb),
    web.post("/groups/{name}/{verb}", group_verb),
]
