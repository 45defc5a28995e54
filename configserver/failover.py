"""The failover jobs: Test failover, Cleanup test failover, Failover, Change recovery
point, Commit — built by ``kinds(deps)`` around what they use (the targets by name, a
work folder, the disk check), passed in by the daemon (``jobkinds.py``).

The recoveries are the steps of ``configserver/recoverysteps.py`` plus their own first
and last ones. The item's state was set by the request (``failoverops.py``); the last
step moves it on, and ``on_end`` settles a job that failed or was cancelled.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.drain import shutdown_source
from configserver.failoverinstant import instant_steps
from configserver.itemrecord import DRILL, FAILOVER, read, record
from configserver.items import ItemState
from configserver.jobdefs import JobKind, JobRun, Step, StepFailed
from configserver.jobs import StepContext
from configserver.recoverysteps import (
    LOCK_WAIT_SECONDS,
    FailoverDeps,
    StepFn,
    cleanup_recovered,
    open_vault,
    steps,
)
from vault import names
from vault.errors import VaultError
from vault.locks import LockedError, locked

__all__ = ["DRILL", "FAILOVER", "FailoverDeps", "kinds"]

def _finish(field: str, state: ItemState, what: str) -> StepFn:
    async def finish(ctx: StepContext) -> str:
        rec, _ = await read(ctx, field)
        if rec.get("work"):  # the target has its own copy (create) and booted it
            await asyncio.to_thread(shutil.rmtree, str(rec["work"]), ignore_errors=True)
        ended = ctx.core.clock()
        # A drill's summary outlives the next drill (``last_success``): drill freshness.
        good = {"last_success": {"job": ctx.job.id, "ended": ended, "point": rec.get("point"),
                                 "rto_seconds": rec.get("rto_seconds")}
                } if field == DRILL else {}
        rec = await record(ctx, field, state=state, result="succeeded", work=None,
                           ended=ended, **good)
        return f"{what}; point {rec.get('point')}, RTO {rec.get('rto_seconds')} s"
    return finish


def _recovery(field: str, deps: FailoverDeps, last: Step, *first: Step) -> tuple[Step, ...]:
    s = steps(field, deps)
    return (Step("prerequisites", "Prerequisites check", s["prerequisites"]), *first,
            Step("select_point", "Select the recovery point", s["select_point"]),
            Step("restore", "Restore the disks from the vault", s["restore"]),
            Step("verify", "Check the disks", s["verify"]),
            Step("create", "Create the machine on the target", s["create"]),
            Step("boot", "Boot the machine", s["boot"]), last)


def _either(field: str, deps: FailoverDeps, last: Step, *first: Step
            ) -> Callable[[dict[str, Any]], tuple[Step, ...]]:
    """The recovery's steps: restored images, or with ``instant`` in the job's parameters
    disks served from the vault (``failoverinstant.py``)."""
    restored = _recovery(field, deps, last, *first)
    instant = instant_steps(field, deps, last, *first)
    return lambda params: instant if params.get("instant") else restored


def _on_end(field: str, made_state: ItemState
            ) -> Callable[[AsyncSession, JobRun, str], Awaitable[None]]:
    """Settle the item when a recovery ends other than succeeded (in the transaction that
    ends the job): ``made_state`` if the job may have made something on the target or in
    its work folder (a cleanup or a new attempt must follow), else back to the state the
    request found (replication resumes)."""
    async def on_end(s: AsyncSession, job: JobRun, state: str) -> None:
        if state == "succeeded":
            return
        item = await s.get(db.ReplicatedItem, job.target)
        if item is None:
            return
        rec = dict(getattr(item, field) or {})
        ours = rec.get("job") == job.id
        if ours:
            setattr(item, field, {**rec, "result": state, "error": job.error,
                                  "ended": job.updated})
        before = str(job.params.get("from_state"))
        made = ours and bool(rec.get("work") or rec.get("made_by") == job.id)
        item.state = made_state if made or before not in set(ItemState) else ItemState(before)
        item.updated = job.updated
    return on_end


async def _stop_replication(ctx: StepContext) -> str:
    # The request set failover_in_progress, which is not a replicating state: the agent's
    # settings no longer ask it to replicate (what Disable protection does, points kept).
    await record(ctx, FAILOVER, state=ItemState.FAILOVER_IN_PROGRESS)
    return "the agent's settings no longer ask it to replicate; recovery points are kept"


def kinds(deps: FailoverDeps) -> tuple[JobKind, ...]:
    """The failover job kinds bound to ``deps``."""
    async def shutdown(ctx: StepContext) -> str:
        return await shutdown_source(ctx, deps.shutdown_timeout)

    async def cleanup_target(ctx: StepContext) -> str:
        rec, _ = await read(ctx, DRILL)
        made: list[str] = []
        # what create made, and what it planned when it was interrupted before saying
        for what in (rec.get("recovered"), rec.get("planned")):
            if what:
                await cleanup_recovered(deps, what)
                made += [r for r in what.get("resources", []) if r not in made]
        for work in {str(rec.get("work") or ""), str(deps.work_root / str(rec.get("job")))}:
            if work and rec.get("job"):
                await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
        await record(ctx, DRILL, recovered=None, planned=None, work=None)
        return f"removed {', '.join(made) or 'nothing'}"

    async def cleanup_done(ctx: StepContext) -> str:
        await record(ctx, DRILL, state=ItemState.PROTECTED, cleaned=ctx.core.clock(),
                     cleanup_job=ctx.job.id, notes=str(ctx.params.get("notes", "")))
        return "drill cleaned up; the item is protected"

    async def delete_vault_points(ctx: StepContext) -> str:
        vault = await open_vault(ctx)
        try:
            async with locked(vault, "exclusive", f"commit failover of {ctx.target}",
                              wait=LOCK_WAIT_SECONDS):
                points = await vault.list_points(ctx.target)
                for p in points:  # the chains are the machine's own: no other point needs them
                    await vault.store.delete(names.POINTS + p.id)
        except (LockedError, VaultError) as e:
            raise StepFailed(f"cannot delete the points from the vault: {e}") from None
        finally:
            await vault.close()
        return f"{len(points)} point(s) deleted from the vault; their data goes at the next prune"

    async def delete_catalog_points(ctx: StepContext) -> str:
        async with ctx.core.sessionmaker() as s:
            result = await s.execute(delete(db.RecoveryPoint).where(
                db.RecoveryPoint.machine == ctx.target))
            await s.commit()
        n: int = result.rowcount  # type: ignore[attr-defined]
        return f"{n} point(s) removed from the catalog"

    async def committed(ctx: StepContext) -> str:
        await record(ctx, FAILOVER, state=ItemState.COMMITTED, committed=ctx.core.clock(),
                     commit_job=ctx.job.id)
        return "failover committed"

    drill_ended = _on_end(DRILL, ItemState.TEST_FAILOVER_DONE)
    failover_ended = _on_end(FAILOVER, ItemState.FAILOVER_IN_PROGRESS)
    drill_record = Step("record", "Record the drill",
                        _finish(DRILL, ItemState.TEST_FAILOVER_DONE, "drill done"))
    failover_last = (Step("record", "Record the failover",
                          _finish(FAILOVER, ItemState.FAILED_OVER, "failed over")),
                     Step("shutdown_source", "Shut the source machine down", shutdown),
                     Step("stop_replication", "Stop replication", _stop_replication))
    return (
        JobKind("test_failover", "Test failover", _recovery(DRILL, deps, drill_record),
                on_end=drill_ended, steps_for=_either(DRILL, deps, drill_record)),
        JobKind("cleanup_test_failover", "Cleanup test failover",
                (Step("cleanup", "Remove what the drill created", cleanup_target),
                 Step("record", "Record the cleanup", cleanup_done))),
        JobKind("failover", "Failover", _recovery(FAILOVER, deps, *failover_last),
                cancellable=False, on_end=failover_ended,
                steps_for=_either(FAILOVER, deps, *failover_last)),
        JobKind("change_recovery_point", "Change recovery point",
                _recovery(FAILOVER, deps, Step("record", "Record the new point",
                                               _finish(FAILOVER, ItemState.FAILED_OVER,
                                                       "recovery point changed"))),
                cancellable=False, on_end=failover_ended),
        JobKind("commit_failover", "Commit",
                (Step("delete_vault_points", "Delete the recovery points from the vault",
                      delete_vault_points),
                 Step("delete_catalog_points", "Delete the recovery points from the catalog",
                      delete_catalog_points),
                 Step("record", "Record the commit", committed)),
                cancellable=False),
    )
