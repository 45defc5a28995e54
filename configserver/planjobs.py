"""The recovery-plan jobs: Plan test failover, Plan cleanup test failover, Plan failover,
Plan commit — one job for a whole plan (``configserver/plans.py``), queued by
``configserver/planops.py`` with the plan's groups copied into its parameters.

Its steps follow the groups in order. For each group: its pre script, its pre manual
action, a step that queues the per-item job of every item of the group (the item verbs
of ``configserver/failoverops.py``, so each item runs exactly as its own verb would, in
parallel with the others: the engine runs jobs of different targets concurrently), one
step per item that waits for that item's job and records the point it used, then the
post script and the post manual action. Any failure — a script, a refusal, an item's
job — fails the step (its title names the group and the item or script; the job's
error is that title and why) and so stops the plan:
the later groups do not start (item jobs already queued run to their end). Run again,
the plan passes by the items already done (``SKIP``: failed over, committed, or nothing
to clean up) and recovers the others.

An item's job is found again after a restart as the first job of its kind on that item
queued after the plan job (and is tagged with ``plan`` and ``plan_job``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update

from configserver import db, failoverops
from configserver.errors import DomainError
from configserver.itemrecord import DRILL, FAILOVER
from configserver.items import ItemState
from configserver.jobdefs import ACTIVE, JobKind, Step, StepFailed
from configserver.jobs import StepContext
from configserver.planmodels import PlanConfirmation
from configserver.planscripts import run_script
from configserver.recoverysteps import StepFn
from configserver.schema import iso

# verb -> (plan job kind, its title, the item record the item job writes, cancellable)
VERBS: dict[str, tuple[str, str, str, bool]] = {
    "test-failover": ("plan_test_failover", "Plan test failover", DRILL, True),
    "cleanup-test-failover": ("plan_cleanup_test_failover", "Plan cleanup test failover",
                              DRILL, True),
    "failover": ("plan_failover", "Plan failover", FAILOVER, False),
    "commit": ("plan_commit", "Plan commit", FAILOVER, False),
}
# verb -> the item states in which a plan passes an item by: already done (a plan run
# again after one of its items failed), or nothing to clean up
SKIP: dict[str, tuple[ItemState, ...]] = {
    "cleanup-test-failover": (ItemState.PROTECTED,), "failover": (ItemState.FAILED_OVER,),
    "commit": (ItemState.COMMITTED,)}
ITEM_TITLES = {"test-failover": "Test failover", "cleanup-test-failover":
               "Cleanup test failover", "failover": "Failover", "commit": "Commit"}


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
    """The item's state if the plan passes it by (``SKIP``), else None."""
    async with ctx.core.sessionmaker() as s:
        row = await s.get(db.ReplicatedItem, item)
    return row.state if row is not None and row.state in SKIP.get(verb, ()) else None


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
                job = await failoverops.request(ctx.core, ctx.engine.kinds, verb, item, body)
            except DomainError as e:
                raise StepFailed(f"item {item}: {e.message}"
                                 + (f" ({e.hint})" if e.hint else "")) from None
            async with ctx.core.sessionmaker() as s:
                await s.execute(update(db.Job).where(db.Job.id == job.id).values(
                    params={**job.params, "plan": ctx.params["plan"], "plan_job": ctx.job.id}))
                await s.commit()
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
        rto = f", RTO {rec['rto_seconds']} s" if rec.get("rto_seconds") is not None and \
            verb in ("test-failover", "failover") else ""
        return f"{title} of {item} succeeded (job {job.id}); point {rec.get('point')}{rto}"
    return run


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
    JobKind(kind, title, (), cancellable=cancellable, steps_for=steps_for(verb))
    for verb, (kind, title, _, cancellable) in VERBS.items())
