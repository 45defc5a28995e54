"""The durable job engine.

A job (table ``jobs``) is a kind, a target (a machine name), parameters and an
ordered list of steps. Each step is an idempotent async function. The engine
writes a step's state to the database before it runs it and after it ends, so
a configuration server that stops, or is killed, resumes every unfinished job
at its current step when it starts again (re-running the step that was
running; ``attempts`` counts the runs and ``job_resumed`` is logged).

Scheduling: for each target, the oldest unfinished job runs and the others wait
(ids sort in creation order); different targets run concurrently. Waiting steps
sleep on the change notifier (``Core.notify()``) with a periodic re-check, so
they cost nothing while nothing happens. A failing step fails the job (the
later steps are skipped) with an error naming the step; an operator may cancel
a cancellable job. A kind may queue a follow-up job on success, in the same
transaction that ends the job, so a crash cannot lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from configserver import db
from configserver.core import Core
from configserver.errors import Conflict, ItemStateError, NotFound
from configserver.jobdefs import (
    ACTIVE,
    JOB,
    JOB_ID,
    JOB_STATES,
    RUNNING,
    STEP_STATES,
    JobKind,
    JobRun,
    Step,
    StepFailed,
    job_doc,
    new_job,
)
from configserver.jobstep import StepContext, wait_tick
from configserver.leader import holds_lock, lead, resign

__all__ = ["ACTIVE", "JOB", "JOB_ID", "JOB_STATES", "STEP_STATES", "JobEngine", "JobKind",
           "JobRun", "Step", "StepContext", "StepFailed", "job_doc", "new_job", "wait_tick"]

log = structlog.get_logger("configserver.jobs")

RETRY_SECONDS = 5.0  # after an engine error (e.g. the database went away) in a job's task


@dataclass
class _Running:
    target: str
    task: asyncio.Task[None]
    step_task: asyncio.Task[str | None] | None = None
    cancel_requested: bool = False


async def _with_its_plan(core: Core, job: JobRun, kind: JobKind) -> str | None:
    """Why ``job`` ends before its next step: the plan job that queued it (``plan_job``)
    was cancelled. Its ``after_cancel`` cancels the item jobs still running; this holds
    for those it missed (the server stopped in between, a standby leads now). None: go on.
    """
    plan_job = job.params.get("plan_job")
    if not plan_job or not kind.cancellable:
        return None
    async with core.sessionmaker() as s:
        state = (await s.execute(select(db.Job.state).where(db.Job.id == plan_job))
                 ).scalar_one_or_none()
    if state != "cancelled":
        return None
    log.info("plan_item_job_cancelled", job=job.id, plan_job=plan_job, target=job.target,
             at="step")
    return f"cancelled by the operator with its plan job {plan_job}"


class JobEngine:
    """Runs the jobs of one configuration server; ``run()`` is its background task.

    ``kinds`` is every job kind it knows (``configserver/jobkinds.py``); a job of another
    kind fails when it is scheduled."""

    recheck_seconds = 10.0

    def __init__(self, core: Core, kinds: Mapping[str, JobKind]) -> None:
        self.core, self.kinds = core, kinds
        self.tick = asyncio.Event()  # replaced (and the old one set) on every change
        self._running: dict[str, _Running] = {}  # job id → its task
        self._targets: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._writes: set[asyncio.Task[int]] = set()
        self._write_lock: dict[str, asyncio.Lock] = {}
        self._leading = False

    def poke(self) -> None:
        old, self.tick = self.tick, asyncio.Event()
        old.set()

    async def _listen(self) -> None:
        # Always inside wait() while not poking, so no notify_all() is missed.
        changed = self.core.notifier.changed
        async with changed:
            while True:
                await changed.wait()
                self.poke()

    @property
    def leading(self) -> bool:
        """Whether this server runs the jobs now (always, on SQLite)."""
        return self._leading

    async def run(self) -> None:
        # Listening first: a standby's long polls wake with the leader's changes too.
        listener = asyncio.create_task(self._listen())
        leader = None
        try:
            while True:
                leader = await lead(self.core.database, self.recheck_seconds)
                self._leading = True
                await self._lead(leader)  # returns only if the leadership was lost
                self._leading = False
                await self._stop_running()
                await resign(leader)
                leader = None
        finally:
            self._leading = False
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await self._stop_running()
            if self._writes:
                await asyncio.gather(*self._writes, return_exceptions=True)
            await resign(leader)

    async def _lead(self, leader: AsyncConnection | None) -> None:
        """Run the jobs while ``leader`` (the connection holding the leader lock; None on
        SQLite) is alive; return when it is not — its session is gone, so is the lock,
        and a standby may lead already: this server must stop running jobs at once."""
        while True:
            tick = self.tick
            if leader is not None and not await holds_lock(leader):
                log.error("job_engine_leadership_lost",
                          hint="the connection holding the leader lock to the catalog was "
                               "lost: the jobs this server ran stop here and resume on the "
                               "server that leads now (this one tries to lead again)")
                self.core.metrics.job_engine_errors.inc()
                return
            try:
                await self._schedule()
            except Exception:
                log.exception("job_scheduler_error")
            await wait_tick(tick, self.recheck_seconds)

    async def _stop_running(self) -> None:
        tasks = [r.task for r in self._running.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _schedule(self) -> None:
        async with self.core.sessionmaker() as s:
            rows = (await s.execute(
                select(db.Job.id, db.Job.target).where(db.Job.state.in_(ACTIVE))
                .order_by(db.Job.id))).all()
        first: dict[str, str] = {}
        for jid, target in rows:
            first.setdefault(target, jid)
        now = asyncio.get_running_loop().time()
        for target, jid in first.items():
            if target in self._targets or self._retry_at.get(jid, 0.0) > now:
                continue
            self._targets.add(target)
            task = asyncio.create_task(self._drive(jid), name=f"job-{jid}")
            self._running[jid] = _Running(target, task)
            task.add_done_callback(functools.partial(self._done, jid))

    def _done(self, jid: str, task: asyncio.Task[None]) -> None:
        r = self._running.pop(jid, None)
        self._write_lock.pop(jid, None)
        if r is not None:
            self._targets.discard(r.target)
        if not task.cancelled() and task.exception() is not None:
            log.error("job_engine_error", job=jid, error=repr(task.exception()))
            self._retry_at[jid] = asyncio.get_running_loop().time() + RETRY_SECONDS
            self.core.metrics.job_engine_errors.inc()
        self.poke()

    # -- persistence: one writer per job, in call order, never cut by a cancellation --

    async def save(self, job: JobRun, expect: tuple[str, ...],
                   extra: Callable[[AsyncSession], Awaitable[None]] | None = None) -> int:
        """Write the job's state if its row is in one of the ``expect`` states; returns the
        number of rows written. ``extra`` runs in the same transaction."""
        lock = self._write_lock.setdefault(job.id, asyncio.Lock())
        values = job.values()

        async def write() -> int:
            async with lock, self.core.sessionmaker() as s:
                result = await s.execute(update(db.Job).where(
                    db.Job.id == job.id, db.Job.state.in_(expect)).values(**values))
                written: int = result.rowcount  # type: ignore[attr-defined]
                if written and extra is not None:
                    await extra(s)
                await s.commit()
            self.poke()  # wakes long polls of this job (and re-checks waiting steps)
            if self.core.notifier.publish is not None:  # and those on the other servers
                await self.core.notifier.publish()
            return written

        task = asyncio.create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def _load(self, jid: str) -> JobRun | None:
        async with self.core.sessionmaker() as s:
            row = await s.get(db.Job, jid)
            return JobRun.of(row) if row is not None else None

    # -- running one job --

    async def _drive(self, jid: str) -> None:
        job = await self._load(jid)
        if job is None or job.state not in ACTIVE:
            return
        kind = self.kinds.get(job.kind)
        now = self.core.clock()
        resumed = job.state in RUNNING
        job.state, job.attempts, job.updated = "running", job.attempts + 1, now
        job.started = job.started or now
        steps = kind.steps_of(job.params) if kind is not None else ()
        if kind is None or len(steps) != len(job.steps):
            await self._finish(job, None, "failed", None,
                               f"this configuration server does not know job kind {job.kind!r}"
                               " (or its steps changed); run the version that created it")
            return
        if not await self.save(job, RUNNING if resumed else ("queued",)):
            return  # cancelled while queued
        if resumed:
            self.core.metrics.jobs_resumed.labels(job.kind).inc()
        log.info("job_resumed" if resumed else "job_started", job=job.id, kind=job.kind,
                 target=job.target, attempts=job.attempts)
        me = self._running[jid]
        for i, spec in enumerate(steps):
            st = job.steps[i]
            if st["state"] in ("succeeded", "skipped"):
                continue
            why = "cancelled by the operator" if me.cancel_requested else \
                await _with_its_plan(self.core, job, kind)
            if why is not None:
                await self._finish(job, kind, "cancelled", i, why)
                return
            now = self.core.clock()
            st.update(state="running", started=st.get("started") or now, ended=None,
                      attempts=int(st.get("attempts") or 0) + 1)
            job.updated = now
            job.recompute_progress()
            await self.save(job, RUNNING)
            log.info("job_step_started", job=job.id, kind=job.kind, target=job.target,
                     step=spec.name, attempt=st["attempts"])
            me.step_task = asyncio.create_task(spec.run(StepContext(self, job, i)))
            if me.cancel_requested:
                # Asked while the step's start was being saved (the step already showed as
                # running, and ``cancel`` found no task to cancel): it would otherwise run
                # to its end with the canceller waiting for it.
                me.step_task.cancel()
            try:
                message = await me.step_task
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not me.cancel_requested or (task is not None and task.cancelling()):
                    raise  # the server is stopping: the job resumes at the next start
                await self._finish(job, kind, "cancelled", i, "cancelled by the operator")
                return
            except StepFailed as e:
                await self._finish(job, kind, "failed", i, str(e))
                return
            except Exception as e:
                log.exception("job_step_error", job=job.id, step=spec.name)
                await self._finish(job, kind, "failed", i,
                                   f"unexpected error: {type(e).__name__}: {e}")
                return
            finally:
                me.step_task = None
            now = self.core.clock()
            st.update(state="succeeded", ended=now, progress=100.0,
                      message=message if message is not None else st.get("message", ""))
            job.updated = now
            job.recompute_progress()
            await self.save(job, RUNNING)
            log.info("job_step_succeeded", job=job.id, kind=job.kind, target=job.target,
                     step=spec.name, message=st["message"])
        await self._finish(job, kind, "succeeded", None, None)

    async def _finish(self, job: JobRun, kind: JobKind | None, state: str, index: int | None,
                      error: str | None) -> None:
        now = self.core.clock()
        for i, st in enumerate(job.steps):
            if i == index:
                st.update(state="failed", ended=now, message=error or "")
            elif st["state"] in ("pending", "running"):
                st.update(state="skipped", ended=now if st["state"] == "running" else None)
        if index is not None and error is not None:
            title = job.steps[index].get("title", job.steps[index]["name"])
            error = f"{title}: {error}"
        job.state, job.error, job.ended, job.updated = state, error, now, now
        if state == "succeeded":
            job.progress = 100.0
        follow: db.Job | None = None
        if state == "succeeded" and kind is not None and kind.then is not None:
            follow = new_job(self.kinds[kind.then], job.target,
                             {**job.params, "after": job.id}, now)

        async def extra(s: AsyncSession) -> None:
            if kind is not None and kind.on_end is not None:
                await kind.on_end(s, job, state)
            if follow is not None:
                s.add(follow)

        if not await self.save(job, ACTIVE, extra):
            return
        self.core.metrics.jobs.labels(job.kind, state).inc()
        fields: dict[str, Any] = {"job": job.id, "kind": job.kind, "target": job.target,
                                  "attempts": job.attempts}
        if error:
            fields["error"] = error
        if follow is not None:
            fields["next_job"] = follow.id
        (log.info if state == "succeeded" else log.warning)(f"job_{state}", **fields)
        await self.core.notify()

    # -- operator actions --

    async def cancel(self, jid: str) -> None:
        """Cancel a queued or running job; returns once it is cancelled (and so are the
        jobs its kind's ``after_cancel`` cancels). Raises ``NotFound`` (unknown job),
        ``Conflict`` (its kind cannot be cancelled) or ``ItemStateError`` (code
        ``job_finished``: it already ended)."""
        job = await self._load(jid)
        if job is None:
            raise NotFound("job_not_found", f"no job with id {jid!r}",
                           "list jobs: siterecovery jobs list")
        kind = self.kinds.get(job.kind)
        if kind is not None and not kind.cancellable:
            raise Conflict("not_cancellable", f"a {kind.title} job cannot be cancelled",
                           "wait for it to end: siterecovery jobs wait " + jid)
        if job.state not in ACTIVE:
            raise ItemStateError("job_finished", f"job {jid} already ended ({job.state})")
        # A caller going away stops neither the cancellation nor what follows from it.
        await asyncio.shield(self._cancel_all(jid, job, kind))

    async def _cancel_all(self, jid: str, job: JobRun, kind: JobKind | None) -> None:
        await self._cancel(jid, job, kind)
        ended = await self._load(jid)
        if kind is not None and kind.after_cancel is not None and ended is not None and \
                ended.state == "cancelled":
            await kind.after_cancel(self.core, ended, self.cancel)

    async def _cancel(self, jid: str, job: JobRun, kind: JobKind | None) -> None:
        r = self._running.get(jid)
        if r is None:
            queued = replace(job, state="cancelled")
            await self._finish_queued(queued, kind)
            if (await self._load(jid) or job).state == "cancelled":
                return
            r = self._running.get(jid)  # it started meanwhile
            if r is None:
                return
        r.cancel_requested = True
        if r.step_task is not None:
            r.step_task.cancel()
        await asyncio.wait([r.task])

    async def _finish_queued(self, job: JobRun, kind: JobKind | None) -> None:
        now = self.core.clock()
        for st in job.steps:
            st["state"] = "skipped"
        job.error, job.ended, job.updated = "cancelled by the operator before it started", now, now

        async def extra(s: AsyncSession) -> None:
            if kind is not None and kind.on_end is not None:
                await kind.on_end(s, job, "cancelled")

        if await self.save(job, ("queued",), extra):
            self.core.metrics.jobs.labels(job.kind, "cancelled").inc()
            log.warning("job_cancelled", job=job.id, kind=job.kind, target=job.target,
                        attempts=job.attempts, error=job.error)
            await self.core.notify()
        if job.id not in self._running:
            self._write_lock.pop(job.id, None)
