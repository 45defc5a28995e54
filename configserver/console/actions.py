"""The console's actions (POST forms, each with the session's CSRF token).

They call the same domain functions as the REST handlers (``failoverops.request``,
``protection.enable|disable|resync``); a refusal (``DomainError``) is shown on the
item's page with its message and hint, with the status the API would answer. The
destructive ones — failover, change of recovery point, commit, disable — go ahead only
when the form's ``confirm`` field is the item's name, typed by the operator.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from multidict import MultiDictProxy

from configserver import failoverops, install, protection
from configserver.console.app import PREFIX, console_of, see_other
from configserver.console.pages import item_page, items_page, job_page
from configserver.errors import DomainError
from configserver.rest import status_of

log = structlog.get_logger("configserver.console")

RECOVERY_VERBS = ("test-failover", "cleanup-test-failover", "failover",
                  "change-recovery-point", "commit")
Form = MultiDictProxy[Any]
DESTRUCTIVE = ("failover", "change-recovery-point", "commit", "disable")
VERBS = (*RECOVERY_VERBS, "resync", "disable")


def _text(form: Form, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _body(verb: str, form: Form) -> dict[str, Any]:
    """The REST body of a recovery verb from its form's fields."""
    body: dict[str, Any] = {}
    if verb in ("test-failover", "failover", "change-recovery-point"):
        body["point"] = _text(form, "point") or "latest-processed"
    if verb == "failover" and _text(form, "shutdown_source") == "yes":
        body["shutdown_source"] = True
    if verb == "cleanup-test-failover":
        body["notes"] = _text(form, "notes")[:4000]
    return body


async def act(request: web.Request) -> web.Response:
    console = console_of(request)
    svc = console.services
    machine, verb = request.match_info["machine"], request.match_info["verb"]
    if verb not in VERBS:
        return console.page(request, "missing.html", 404, title="Not found", nav="items",
                            message=f"no action {verb!r}", hint="use the item's page")
    form = await request.post()  # the guard checked its CSRF token
    if verb in DESTRUCTIVE and _text(form, "confirm") != machine:
        return await item_page(request, status=422, error=(
            f"{verb}: type the item's name, {machine}, in the confirmation box to go on"))
    try:
        if verb in RECOVERY_VERBS:
            job = await failoverops.request(svc, svc.jobs.kinds, verb, machine,
                                            _body(verb, form))
            jid: str | None = job.id
        elif verb == "disable":
            jid = (await protection.disable(svc, svc.jobs, machine)).id
        else:
            await protection.resync(svc, machine)
            jid = None
    except DomainError as e:
        log.info("console_action_refused", verb=verb, machine=machine, code=e.code)
        return await item_page(request, status=status_of(e),
                               error=f"{e.message}. {e.hint}" if e.hint else e.message)
    await svc.notify()
    log.info("console_action", verb=verb, machine=machine, job=jid)
    return see_other(f"{PREFIX}/jobs/{jid}" if jid else f"{PREFIX}/items/{machine}")


async def enable(request: web.Request) -> web.Response:
    console = console_of(request)
    svc = console.services
    form = await request.post()  # the guard checked its CSRF token
    machine, policy = _text(form, "machine"), _text(form, "policy") or "default"
    try:
        job = await protection.enable(svc, machine, policy, install.site_url(svc.cfg))
    except DomainError as e:
        log.info("console_action_refused", verb="enable", machine=machine, code=e.code)
        return await items_page(request, status=status_of(e),
                                error=f"{e.message}. {e.hint}" if e.hint else e.message)
    await svc.notify()
    log.info("console_action", verb="enable", machine=machine, job=job.id)
    return see_other(f"{PREFIX}/items/{machine}")


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a queued or running job (``POST /api/v1/jobs/{id}/cancel``); returns once
    it is cancelled. A refusal — its kind cannot be cancelled, it ended — is shown on
    the job's page."""
    console = console_of(request)
    jid = request.match_info["id"]
    await request.post()  # the guard checked its CSRF token
    try:
        await console.services.jobs.cancel(jid)
    except DomainError as e:
        log.info("console_action_refused", code=e.code, verb="cancel", job=jid)
        if e.code == "job_not_found":
            return console.page(request, "missing.html", 404, title="Not found",
                                nav="jobs", message=e.message, hint="see the list of jobs")
        return await job_page(request, status=status_of(e), error=(
            f"{e.message}. {e.hint}" if e.hint else e.message))
    await console.services.notify()
    log.info("console_action", verb="cancel", job=jid)
    return see_other(f"{PREFIX}/jobs/{jid}")


ROUTES = [
    web.post("/items/{machine}/{verb}", act),
    web.post("/enable", enable),
    web.post("/jobs/{id}/cancel", cancel_job),
]
