"""The recovery-plan requests: the checks behind ``POST /api/v1/plans/{name}/<verb>``
(queue a plan job, ``configserver/planjobs.py``) and ``POST /api/v1/jobs/{id}/resume``
(confirm the manual action a job waits at).

A plan job is queued only when every item of the plan may take the verb now (the item
states of ``failoverops.ALLOWED``, or those in which the plan passes the item by,
``planjobs.SKIP``: a failover run again after one item failed passes the items failed
over already) and has no job of its own running, and when no other job of the plan is
running; else ``ItemStateError`` naming each item refused and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import select

from configserver import db, failoverops, plans
from configserver.core import Core
from configserver.errors import InvalidRequest, ItemStateError, NotFound
from configserver.items import ItemState
from configserver.jobdefs import ACTIVE, JobKind, new_job
from configserver.planjobs import SKIP, VERBS
from configserver.planmodels import PlanConfirmation

log = structlog.get_logger("configserver.plans")


async def request(core: Core, kinds: Mapping[str, JobKind], verb: str, name: str,
                  body: dict[str, Any]) -> db.Job:
    """Queue the plan job of ``verb`` for plan ``name``; the job. ``body``: what the item
    verb takes (point, at, network, notes, shutdown_source ...), given to every item."""
    _need_notes(verb, body)
    plan = await plans.stored(core, name)
    return await queue(core, kinds, verb, Whole(
        f"plan {name!r}", plans.job_target(name), name, plan.groups,
        f"wait for it: siterecovery plan show {name}",
        f"take them out of the plan: siterecovery plan update {name}"), body)


def _need_notes(verb: str, body: dict[str, Any]) -> None:
    if verb == "cleanup-test-failover" and not str(body.get("notes") or "").strip():
        raise InvalidRequest("notes_required", "cleaning up a test failover needs notes: what "
                             "the drill showed", "pass --notes TEXT")


@dataclass(frozen=True)
class Whole:
    """What a plan job recovers: a plan, or a consistency group (``groupops.py``)."""

    what: str  # for messages: "plan 'dr'"
    target: str  # the job's target
    name: str  # the job's "plan" parameter
    groups: list[dict[str, Any]]  # as a plan stores them
    wait_hint: str  # how to follow the job running
    out_hint: str  # how to leave a refused item out
    points: dict[str, str] | None = None  # item -> its own point (a group point's)


async def queue(core: Core, kinds: Mapping[str, JobKind], verb: str, whole: Whole,
                body: dict[str, Any]) -> db.Job:
    """Queue the plan job of ``verb`` for ``whole``, when every item may take it now."""
    _need_notes(verb, body)
    items = [i for g in whole.groups for i in g["items"]]
    allowed = failoverops.ALLOWED[verb][1] + SKIP.get(verb, ())
    target = whole.target
    now = core.clock()
    async with core.sessionmaker() as s:
        rows = {r.machine: r for r in (await s.execute(select(db.ReplicatedItem).where(
            db.ReplicatedItem.machine.in_(items)))).scalars()}
        busy = set((await s.execute(select(db.Job.target).where(
            db.Job.target.in_([*items, target]), db.Job.state.in_(ACTIVE)))).scalars())
        if target in busy:
            raise ItemStateError("plan_job_running", f"a job of {whole.what} is running or "
                                 "queued", whole.wait_hint)
        refused = []
        for item in items:
            row = rows.get(item)
            if row is None:
                refused.append(f"{item}: not replicated any more")
            elif ItemState(row.state) not in allowed:
                refused.append(f"{item}: {row.state}")
            elif item in busy:
                refused.append(f"{item}: a job of it is running or queued")
        if refused:
            raise ItemStateError(
                "plan_not_allowed", f"cannot {verb.replace('-', ' ')} {whole.what}: "
                + "; ".join(refused) + f" (allowed in: {', '.join(allowed)})",
                "fix or wait for those items (siterecovery items show MACHINE), or "
                + whole.out_hint)
        params: dict[str, Any] = {
            "plan": whole.name, "verb": verb, "groups": whole.groups,
            "body": {k: v for k, v in body.items() if v not in (None, "", False)}}
        if whole.points:
            params["points"] = whole.points
        job = new_job(kinds[VERBS[verb][0]], target, params, now)
        s.add(job)
        await s.commit()
    log.info("plan_requested", verb=verb, plan=whole.name, job=job.id, items=len(items))
    return job


async def resume(core: Core, jid: str, notes: str) -> None:
    """Confirm the manual action job ``jid`` waits at: ``NotFound`` for no such job,
    ``ItemStateError`` (``job_not_waiting``) when it waits for nothing."""
    async with core.sessionmaker() as s:
        job = await s.get(db.Job, jid)
        if job is None:
            raise NotFound("job_not_found", f"no job with id {jid!r}",
                           "list jobs: siterecovery jobs list")
        step = next((st["name"] for st in job.steps or [] if st["state"] == "running"), None)
        if job.state != "waiting" or step is None:
            raise ItemStateError("job_not_waiting", f"job {jid} is {job.state}: it waits for "
                                 "no confirmation",
                                 f"see what it does: siterecovery jobs show {jid}")
        if await s.get(PlanConfirmation, (jid, step)) is None:
            s.add(PlanConfirmation(job=jid, step=step, confirmed=core.clock(), notes=notes))
            await s.commit()
    log.info("job_resume_confirmed", job=jid, step=step)
