"""Routes: recovery plans (create, list, show, update, delete; test failover, cleanup,
failover, commit, re-protect and failback of a whole plan, each one job) and the
confirmation of a manual action a job waits at (``POST /api/v1/jobs/{id}/resume``). The rules are in
``configserver/plans.py`` and ``configserver/planops.py``, the job in
``configserver/planjobs.py``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from configserver import api_failover, db, planops, plans
from configserver.api_failover import CLEANUP_BODY, FAILOVER_BODY, JOB_REPLY, RECOVER_BODY
from configserver.jobs import JOB, JOB_ID, job_doc
from configserver.rest import NAME, ApiError, Call, Handler, Route, array, obj, reply

_NAME = {"name": NAME}
DELETED = obj({"deleted": {"type": "string"}}, ["deleted"])
RESUME_BODY = obj({"notes": {"type": "string", "maxLength": 4000,
                             "description": "what the operator did (kept on the job step)"}})


async def create_plan(call: Call) -> web.Response:
    doc = await plans.create(call.services, call.body)
    await call.services.notify()
    return reply(doc, status=201)


async def list_plans(call: Call) -> web.Response:
    return reply({"plans": await plans.list_all(call.services)})


async def show_plan(call: Call) -> web.Response:
    return reply(await plans.get(call.services, call.params["name"]))


async def update_plan(call: Call) -> web.Response:
    doc = await plans.update(call.services, call.params["name"], call.body)
    await call.services.notify()
    return reply(doc)


async def delete_plan(call: Call) -> web.Response:
    await plans.delete(call.services, call.params["name"])
    await call.services.notify()
    return reply({"deleted": call.params["name"]})


async def resume_job(call: Call) -> web.Response:
    jid = call.params["id"]
    await planops.resume(call.services, jid, str((call.body or {}).get("notes") or ""))
    await call.services.notify()
    async with call.services.sessionmaker() as s:
        job = await s.get(db.Job, jid)
    if job is None:  # deleted meanwhile
        raise ApiError(404, "job_not_found", f"no job with id {jid!r}")
    return reply(job_doc(job, call.services.jobs.kinds))


def item_body(verb: str) -> dict[str, Any]:
    """The body the item route of ``verb`` takes (``POST /api/v1/items/{machine}/<verb>``):
    a plan or group verb passes the same options through to every item."""
    body = next(r.body for r in api_failover.ROUTES
                if r.method == "POST" and r.path.endswith(f"/{verb}"))
    assert body is not None, verb
    return body


BACK_ORDER = (" Groups run in the plan's order, as for failover (the application's start "
              "order; the scripts and manual actions too, with "
              "SITERECOVERY_PLAN_OPERATION set to the verb).")


def _starter(verb: str) -> Handler:
    async def start(call: Call) -> web.Response:
        job = await planops.request(call.services, call.services.jobs.kinds, verb,
                                    call.params["name"], call.body or {})
        await call.services.notify()
        return reply({"job": job_doc(job, call.services.jobs.kinds)}, status=202)
    start.__name__ = "plan_" + verb.replace("-", "_")  # the OpenAPI operationId
    return start


def _verb(verb: str, summary: str, body: dict[str, Any], description: str,
          rules: dict[str, Any] | None = None) -> Route:
    return Route("POST", f"/api/v1/plans/{{name}}/{verb}", _starter(verb), summary, "plans",
                 params=_NAME, body=body, responses={202: JOB_REPLY}, rules=rules,
                 refusals=api_failover.REPROTECT_REFUSALS if verb == "reprotect" else (),
                 description=description + " Groups run in order, the items of a group in "
                 "parallel, each as its own item job; the plan job has a step per item "
                 "(recording the point it used), per script and per manual action, and "
                 "stops at the first that fails, naming it. 404 for a plan that does not "
                 "exist; 409 (plan_not_allowed) naming each item whose state does not allow "
                 "it or whose job runs, or (plan_job_running) while a job of the plan runs.")


ROUTES = [
    Route("POST", "/api/v1/plans", create_plan, "Create a recovery plan", "plans",
          body=plans.CREATE, responses={201: plans.PLAN}, refusals=plans.REFUSALS,
          description="Ordered groups of replicated items, each group with optional pre and "
                      "post scripts (run on this server) and manual actions. 409 "
                      "plan_exists for a name taken."),
    Route("GET", "/api/v1/plans", list_plans, "List recovery plans", "plans",
          responses={200: obj({"plans": array(plans.PLAN)}, ["plans"])}),
    Route("GET", "/api/v1/plans/{name}", show_plan, "Show a recovery plan", "plans",
          params=_NAME, responses={200: plans.PLAN}),
    Route("PATCH", "/api/v1/plans/{name}", update_plan, "Change a recovery plan", "plans",
          params=_NAME, body=plans.UPDATE, responses={200: plans.PLAN},
          refusals=plans.REFUSALS,
          description="groups replaces every group; a job already queued keeps the groups "
                      "it was queued with."),
    Route("DELETE", "/api/v1/plans/{name}", delete_plan, "Delete a recovery plan", "plans",
          params=_NAME, responses={200: DELETED},
          description="The items are left as they are. 409 while a job of the plan runs."),
    _verb("test-failover", "Test failover (a drill) of every item of a plan", RECOVER_BODY,
          "Queues Plan test failover: each item's Test failover with these settings."),
    _verb("cleanup-test-failover", "Clean up the test failover of a plan", CLEANUP_BODY,
          "Queues Plan cleanup test failover: each item's Cleanup test failover with these "
          "notes (notes that are only blanks: 422 notes_required).",
          rules={"properties": {"notes": {"pattern": "\\S"}}}),
    _verb("failover", "Fail every item of a plan over", FAILOVER_BODY,
          "Queues Plan failover (not cancellable): each item's Failover."),
    _verb("commit", "Commit the failover of a plan", obj({}),
          "Queues Plan commit (not cancellable): each item's Commit."),
    _verb("reprotect", "Re-protect every item of a plan", item_body("reprotect"),
          "Queues Plan re-protect: each item's Re-protect (its recovered machine's disks "
          "into the vault, a delta on its failover point or its last re-protect) with "
          "these options; an item re-protected already takes its next delta, so nothing "
          "is passed by." + BACK_ORDER),
    _verb("failback", "Fail every item of a plan back onto its original machine",
          item_body("failback"),
          "Queues Plan failback (not cancellable): each item's Failback with these "
          "options; each original machine's agent writes only the blocks that differ; the "
          "items end protected, direction forward. Run again after one failed, it passes "
          "by the items failed back already (protected, their failback recorded); an item "
          "protected that was never failed over is refused." + BACK_ORDER),
    Route("POST", "/api/v1/jobs/{id}/resume", resume_job,
          "Confirm the manual action a job waits at", "jobs", params={"id": JOB_ID},
          body=RESUME_BODY, responses={200: JOB},
          description="A plan job in the state 'waiting' goes on with its next step. 404 "
                      "for no such job; 409 job_not_waiting when it waits for nothing."),
]
