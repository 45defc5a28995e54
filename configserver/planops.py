"""The recovery-plan requests: the checks behind ``POST /api/v1/plans/{name}/<verb>``
(queue a plan job, ``configserver/planjobs.py``) and ``POST /api/v1/jobs/{id}/resume``
(confirm the manual action a job waits at).

A plan job is queued only when every item of the plan may take the verb now (the item
states of ``failoverops.ALLOWED``, or done already so that the plan passes the item by,
``planjobs.passed_by``: a failover run again after one item failed passes the items failed
over already, a failback the items protected again by their failback — not an item
protected that was never failed over) and has no job of its own running, and when no
other job of the plan is running; else ``ItemStateError`` naming each item refused and why.
``judge`` is that rule for one verb (the items it would recover, pass by or be refused
by); ``verdicts`` applies it to the catalog now, for the console's plan and group pages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db, failoverops, plans
from configserver.core import Core
from configserver.errors import InvalidRequest, ItemStateError, NotFound
from configserver.items import ItemState
from configserver.jobdefs import ACTIVE, JobKind, new_job
from configserver.planjobs import SKIP, VERBS, passed_by
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
    failoverops.one_way_to_read(body)
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


@dataclass(frozen=True)
class Verdict:
    """What a plan job of ``verb`` would do with each item now (``judge``)."""

    verb: str
    run: tuple[str, ...]  # the items it would recover
    passed: tuple[str, ...]  # the items it would pass by, done already ("item: state")
    refused: tuple[str, ...]  # "item: why", each item that stops it
    needs: tuple[str, ...]  # the states in which an item takes it

    @property
    def useful(self) -> bool:
        """Allowed, and something left to do (not every item passed by)."""
        return bool(self.run) and not self.refused


def judge(verb: str, items: list[str], rows: Mapping[str, db.ReplicatedItem],
          busy: set[str]) -> Verdict:
    """The verdict of ``verb`` on ``items`` in the states of ``rows``, with the items whose
    own job runs in ``busy``: every item may take it (``failoverops.ALLOWED``), or is done
    already and passed by (``planjobs.passed_by``), or refuses it."""
    allowed = failoverops.ALLOWED[verb][1]
    run, passed, refused = [], [], []
    for item in items:
        row = rows.get(item)
        done = None if row is None else passed_by(verb, row)
        if row is None:
            refused.append(f"{item}: not replicated any more")
        elif ItemState(row.state) not in allowed and done is None:
            refused.append(f"{item}: {row.state}" + (
                ", not failed over (nothing to fail back)"
                if verb == "failback" and row.state in SKIP[verb] else ""))
        elif item in busy:
            refused.append(f"{item}: a job of it is running or queued")
        elif done is not None:
            passed.append(f"{item}: {done}")
        else:
            run.append(item)
    return Verdict(verb, tuple(run), tuple(passed), tuple(refused),
                   tuple(str(st) for st in allowed))


async def _catalog(s: AsyncSession, items: list[str], target: str
                   ) -> tuple[dict[str, db.ReplicatedItem], set[str]]:
    """The rows of ``items`` and which of them, and of ``target``, have a job running."""
    rows = {r.machine: r for r in (await s.execute(select(db.ReplicatedItem).where(
        db.ReplicatedItem.machine.in_(items)))).scalars()}
    busy = set((await s.execute(select(db.Job.target).where(
        db.Job.target.in_([*items, target]), db.Job.state.in_(ACTIVE)))).scalars())
    return rows, busy


async def verdicts(core: Core, groups: list[dict[str, Any]], target: str,
                   verbs: Sequence[str]) -> dict[str, Verdict]:
    """``judge`` of each of ``verbs`` on the items of ``groups`` (as a plan stores them)
    now: what ``queue`` would accept (a job of ``target`` running aside: the caller sees
    it in the jobs)."""
    items = [i for g in groups for i in g["items"]]
    async with core.sessionmaker() as s:
        rows, busy = await _catalog(s, items, target)
    return {verb: judge(verb, items, rows, busy) for verb in verbs}


async def queue(core: Core, kinds: Mapping[str, JobKind], verb: str, whole: Whole,
                body: dict[str, Any]) -> db.Job:
    """Queue the plan job of ``verb`` for ``whole``, when every item may take it now."""
    _need_notes(verb, body)
    items = [i for g in whole.groups for i in g["items"]]
    allowed = failoverops.ALLOWED[verb][1]
    done = ", ".join(f"{st} (" + ("failed back" if verb == "failback" else "done") + ")"
                     for st in SKIP.get(verb, ()))
    target = whole.target
    now = core.clock()
    async with core.sessionmaker() as s:
        rows, busy = await _catalog(s, items, target)
        if target in busy:
            raise ItemStateError("plan_job_running", f"a job of {whole.what} is running or "
                                 "queued", whole.wait_hint)
        refused = judge(verb, items, rows, busy).refused
        if refused:
            raise ItemStateError(
                "plan_not_allowed", f"cannot {verb.replace('-', ' ')} {whole.what}: "
                + "; ".join(refused) + f" (allowed in: {', '.join(allowed)}"
                + (f"; passed by: {done}" if done else "") + ")",
                "fix or wait for those items (siterecovery items show MACHINE), or "
                + whole.out_hint)
        # a 0 is a value (``0 in (None, False)`` is true): only what is not given goes
        params: dict[str, Any] = {
            "plan": whole.name, "verb": verb, "groups": whole.groups,
            "body": {k: v for k, v in body.items()
                     if v is not None and v is not False and v != ""}}
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
