"""The recovery-plan jobs: Plan test failover, Plan cleanup test failover, Plan failover,
Plan commit, Plan re-protect, Plan failback — one job for a whole plan
(``configserver/plans.py``) or consistency group (``configserver/groupops.py``), queued by
``configserver/planops.py`` with the plan's groups copied into its parameters.

Its steps follow the groups in order. For each group: its pre script, its pre manual
action, a step that queues the per-item job of every item of the group (the item verbs
of ``configserver/failoverops.py``, so each item runs exactly as its own verb would, in
parallel with the others: the engine runs jobs of different targets concurrently), one
step per item that waits for that item's job and records the point it used, then the
post script and the post manual action. Any failure — a script, a refusal, an item's
job — fails the step (its title names the group and the item or script; the job's
error is that title and why) and so stops the plan:
the later groups do not start (item jobs already queued run to their end). An operator's
cancel of a plan job (the drills and re-protects: failover, commit and failback cannot
be cancelled) cancels the item jobs it queued that still run (``cancel_children``). Run again,
the plan passes by the items already done (``passed_by``: failed over, committed, nothing
to clean up, or failed back — ``protected`` again with the failback of its newest
failover recorded as succeeded, never merely protected) and recovers the others.
Re-protect passes nothing by: an item re-protected already takes its next delta (only
the blocks written since), so a re-run, or a later one before the failback, brings every
item's reverse-direction point up to date.

Failback runs the groups in the plan's order, as failover does: the order is the
application's start order (its database before its application servers), and each
original machine comes back in it, with the same scripts and manual actions
(``SITERECOVERY_PLAN_OPERATION=failback``).

An item's job is found again after a restart as the first job of its kind on that item
queued after the plan job (and is tagged with ``plan`` and ``plan_job``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from sqlalchemy import select

from configserver import db, failoverops
from configserver.core import Core
from configserver.errors import Conflict, DomainError, ItemStateError
from configserver.itemrecord import DRILL, FAILOVER
from configserver.items import ItemState
from configserver.jobdefs import ACTIVE, JobKind, JobRun, Step, StepFailed
from configserver.jobs import StepContext
from configserver.planmodels import PlanConfirmation
from configserver.planscripts import run_script
from configserver.recoverysteps import StepFn
from configserver.schema import iso

log = structlog.get_logger("configserver.plans")
# verb -> (plan job kind, its title, the item record the item job writes, cancellable)
VERBS: dict[str, tuple[str, str, str, bool]] = {
    "test-failover": ("plan_test_failover", "Plan test failover", DRILL, True),
    "cleanup-test-failover": ("plan_cleanup_test_failover", "Plan cleanup test failover",
                              DRILL, True),
    "failover": ("plan_failover", "Plan failover", FAILOVER, False),
    "commit": ("plan_commit", "Plan commit", FAILOVER, False),
    "reprotect": ("plan_reprotect", "Plan re-protect", FAILOVER, True),
    "failback": ("plan_failback", "Plan failback", FAILOVER, False),
}
# verb -> the item states in which a plan passes an item by: already done (a plan run
# again after one of its items failed), or nothing to clean up; failback's only with
# its failback recorded (``passed_by``)
SKIP: dict[str, tuple[ItemState, ...]] = {
    "cleanup-test-failover": (ItemState.PROTECTED,), "failover": (ItemState.FAILED_OVER,),
    "commit": (ItemState.COMMITTED,), "failback": (ItemState.PROTECTED,)}
ITEM_TITLES = {"test-failover": "Test failover", "cleanup-test-failover":
               "Cleanup test failover", "failover": "Failover", "commit": "Commit",
               "reprotect": "Re-protect", "failback": "Failback"}


def failed_back(row: db.ReplicatedItem) -> str | None:
    """The job that failed ``row`` back from its newest failover, if one succeeded (a
    new failover starts a fresh record: an older failback does not count)."""
    fb = (row.failover or {}).get("failback") or {}
    return str(fb.get("job")) if fb.get("result") == "succeeded" else None


def passed_by(verb: str, row: db.ReplicatedItem) -> str | None:
    """Why a plan job of ``verb`` passes item ``row`` by (it is done already), else None.
    A failback counts as done only for an item protected again by a failback: one merely
    protected (never failed over) is refused up front (``planops.queue``)."""
    if row.state not in SKIP.get(verb, ()):
        return None
    if verb == "failback":
        job = failed_back(row)
        return f"{row.state} (failed back by job {job})" if job else None
    return str(row.state)


def _group(ctx: StepContext, g: int) -> dict[str, Any]:
    group: dict[str, Any] = ctx.params["groups"][g]
    return group


async def _child(ctx: StepContext, verb: str, item: str) -> db.Job | None:
    """The item's job this plan job queued, if it did."""
    kind = failoverops.ALLOWED[verb][0]
    async with ctx.core.sessionmaker() as s:
        return (await s.execute(select(db.Job).where(
            db.Job.target == item, db.Job.kind == kind, db.Job.id > ctx.job.id)
            .order_by(db.Job.id).limit(1))).scalars().first()


async def _skipped(ctx: StepContext, verb: str, item: str) -> str | None:
    """Why the plan passes the item by (``passed_by``), else None."""
    async with ctx.core.sessionmaker() as s:
        row = await s.get(db.ReplicatedItem, item)
    return passed_by(verb, row) if row is not None else None


def _script(g: int, phase: str) -> StepFn:
    async def run(ctx: StepContext) -> str:
        group = _group(ctx, g)
        script = group[f"{phase}_script"]
        path, timeout = str(script["path"]), float(script["timeout_seconds"])
        what = f"the {phase} script {path}"
        await ctx.progress(0.0, f"running {path}")
        env = {"SITERECOVERY_PLAN": str(ctx.params["plan"]),
               "SITERECOVERY_PLAN_GROUP": str(group["name"]),
               "SITERECOVERY_PLAN_ITEMS": " ".join(group["items"]),
               "SITERECOVERY_PLAN_OPERATION": str(ctx.params["verb"]),
               "SITERECOVERY_PLAN_PHASE": phase, "SITERECOVERY_JOB": ctx.job.id}
        try:
            r = await run_script(path, list(script["args"]), env, timeout)
        except OSError as e:
            raise StepFailed(f"{what} cannot be run: {e}") from None
        out = r.output or "(none)"
        if r.status is None:
            raise StepFailed(f"{what} did not end within {timeout:.0f} s and was killed; "
                             f"its output: {out}")
        if r.status != 0:
            raise StepFailed(f"{what} failed (exit status {r.status}); its output: {out}")
        return f"{path} exited 0; its output: {out}"
    return run


def _action(g: int, phase: str, step: str) -> StepFn:
    async def run(ctx: StepContext) -> str:
        text = str(_group(ctx, g)[f"{phase}_action"])

        async def confirmed() -> PlanConfirmation | None:
            async with ctx.core.sessionmaker() as s:
                return await s.get(PlanConfirmation, (ctx.job.id, step))

        await ctx.progress(0.0, f"waiting for an operator: {text} (when done: siterecovery "
                                f"jobs resume {ctx.job.id})")
        row = await ctx.wait_for_operator(confirmed, what=f"the manual action {text!r}")
        return f"confirmed {iso(row.confirmed)}: {text}" + (
            f"; notes: {row.notes}" if row.notes else "")
    return run


def _start(g: int) -> StepFn:
    async def run(ctx: StepContext) -> str:
        group, verb = _group(ctx, g), str(ctx.params["verb"])
        started = []
        for item in group["items"]:
            if await _child(ctx, verb, item) is not None:  # queued before a restart
                continue
            if await _skipped(ctx, verb, item):
                continue
            body = dict(ctx.params.get("body") or {})
            if (own := (ctx.params.get("points") or {}).get(item)) is not None:
                body["point"] = own  # a consistency group's: each member its own point
            try:
                job = await failoverops.request(
                    ctx.core, ctx.engine.kinds, verb, item, body,
                    tags={"plan": ctx.params["plan"], "plan_job": ctx.job.id})
            except DomainError as e:
                raise StepFailed(f"item {item}: {e.message}"
                                 + (f" ({e.hint})" if e.hint else "")) from None
            await ctx.core.notify()
            started.append(f"{item} (job {job.id})")
        return f"{ITEM_TITLES[verb]} queued for {len(group['items'])} item(s)" + (
            f": {', '.join(started)}" if started else "")
    return run


def _item(item: str) -> StepFn:
    async def run(ctx: StepContext) -> str:
        verb = str(ctx.params["verb"])
        title = ITEM_TITLES[verb]

        async def ended() -> db.Job | str | None:
            job = await _child(ctx, verb, item)
            if job is None and (state := await _skipped(ctx, verb, item)):
                return state
            if job is None:
                raise StepFailed(f"no {title} job of {item} was queued by this plan")
            if job.state in ACTIVE:
                await ctx.progress(job.progress, f"job {job.id} {job.state}")
                return None
            return job

        found: db.Job | str = await ctx.wait_for(ended, what=f"the {title} job of {item}")
        if isinstance(found, str):
            return f"{item} passed by: it is {found} already"
        job = found
        if job.state != "succeeded":
            raise StepFailed(f"the {title} job {job.id} of {item} {job.state}: {job.error}")
        async with ctx.core.sessionmaker() as s:
            row = await s.get(db.ReplicatedItem, item)
            rec = dict(getattr(row, VERBS[verb][2]) or {}) if row is not None else {}
        return f"{title} of {item} succeeded (job {job.id}); {_outcome(verb, rec)}"
    return run


def _outcome(verb: str, rec: dict[str, Any]) -> str:
    """What an item's job recorded, for its plan step: the point it used, and more."""
    if verb == "reprotect":
        rp = rec.get("reprotect") or {}
        how = "whole" if rp.get("last_full") else "a delta"
        if rp.get("via") == "agent":
            return f"point {rp.get('last_point')} from the recovered machine's agent ({how})"
        return (f"point {rp.get('last_point')} ({rp.get('last_blocks_stored')} block(s) "
                f"stored, {how})")
    if verb == "failback":
        fb = rec.get("failback") or {}
        return (f"point {fb.get('point')}; {fb.get('blocks_written')} of "
                f"{fb.get('blocks_compared')} block(s) written onto the original machine")
    rto = f", RTO {rec['rto_seconds']} s" if rec.get("rto_seconds") is not None and \
        verb in ("test-failover", "failover") else ""
    return f"point {rec.get('point')}{rto}"


async def cancel_children(core: Core, job: JobRun,
                          cancel: Callable[[str], Awaitable[None]]) -> None:
    """An operator cancelled the plan job ``job``: cancel the item jobs it queued that
    still run (a cancelled plan drill stops its items' drills too, as a plan re-protect
    its items' re-protects). Each item's job ends as its own cancel ends it."""
    async with core.sessionmaker() as s:
        rows = (await s.execute(select(db.Job).where(
            db.Job.state.in_(ACTIVE), db.Job.id > job.id))).scalars().all()
    for row in rows:
        if (row.params or {}).get("plan_job") != job.id:
            continue
        try:
            await cancel(row.id)
        except (Conflict, ItemStateError) as e:  # not cancellable, or it ended meanwhile
            log.info("plan_item_job_left", job=row.id, plan_job=job.id, target=row.target,
                     reason=e.message)
            continue
        log.info("plan_item_job_cancelled", job=row.id, plan_job=job.id, target=row.target)


def steps_for(verb: str) -> Callable[[dict[str, Any]], tuple[Step, ...]]:
    """The steps of a plan job of ``verb``, from its parameters (the plan's groups)."""
    def build(params: dict[str, Any]) -> tuple[Step, ...]:
        out: list[Step] = []
        for g, group in enumerate(params["groups"]):
            name, n = str(group["name"]), g + 1
            if group.get("pre_script"):
                out.append(Step(f"g{n}_pre_script", f"{name}: pre script", _script(g, "pre")))
            if group.get("pre_action"):
                out.append(Step(f"g{n}_pre_action", f"{name}: manual action",
                                _action(g, "pre", f"g{n}_pre_action")))
            out.append(Step(f"g{n}_start", f"{name}: queue the items' jobs", _start(g)))
            out += [Step(f"item_{item}", f"{name}: {item}", _item(item))
                    for item in group["items"]]
            if group.get("post_script"):
                out.append(Step(f"g{n}_post_script", f"{name}: post script",
                                _script(g, "post")))
            if group.get("post_action"):
                out.append(Step(f"g{n}_post_action", f"{name}: manual action",
                                _action(g, "post", f"g{n}_post_action")))
        return tuple(out)
    return build


KINDS: tuple[JobKind, ...] = tuple(
    JobKind(kind, title, (), cancellable=cancellable, steps_for=steps_for(verb),
            after_cancel=cancel_children)
    for verb, (kind, title, _, cancellable) in VERBS.items())
