"""What a job's step function gets (``StepContext``): its job, the catalog, progress
reporting, and waiting on the server's changes (configserver/jobs.py runs the steps).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from configserver.core import Core
from configserver.jobdefs import RUNNING, JobKind, JobRun, StepFailed

log = structlog.get_logger("configserver.jobs")

T = TypeVar("T")


class Engine(Protocol):
    """What a step's context uses of the job engine (``JobEngine``)."""

    core: Core
    kinds: Mapping[str, JobKind]  # a step may queue jobs of other kinds (a plan's)
    tick: asyncio.Event  # set (and replaced) on every change of the server's state
    recheck_seconds: float

    async def save(self, job: JobRun, expect: tuple[str, ...],
                   extra: Callable[[AsyncSession], Awaitable[None]] | None = None) -> int: ...


class StepContext:
    """What a step function gets: its job, the catalog (``core``), progress reporting and
    waiting."""

    def __init__(self, engine: Engine, job: JobRun, index: int) -> None:
        self.engine, self.job, self.index = engine, job, index
        self.core = engine.core

    @property
    def target(self) -> str:
        return self.job.target

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params

    @property
    def started(self) -> float:
        """When this step first started (kept across restarts)."""
        return float(self.job.steps[self.index]["started"])

    async def progress(self, percent: float, message: str | None = None) -> None:
        """Record the step's progress (written only when it changed)."""
        st = self.job.steps[self.index]
        percent = round(max(0.0, min(100.0, percent)), 2)
        if st["progress"] == percent and (message is None or st["message"] == message):
            return
        st["progress"] = percent
        if message is not None:
            st["message"] = message
        self.job.updated = self.core.clock()
        self.job.recompute_progress()
        await self.engine.save(self.job, RUNNING)

    async def wait_for(self, check: Callable[[], Awaitable[T | None]], *, what: str,
                       timeout: float | None = None) -> T:
        """Re-run ``check`` whenever the server's state changes (and every
        ``engine.recheck_seconds``) until it returns something other than None. Fails
        the step after ``timeout`` seconds (server clock) from the step's first start."""
        while True:
            tick = self.engine.tick
            result = await check()
            if result is not None:
                return result
            if timeout is not None and self.core.clock() >= self.started + timeout:
                raise StepFailed(f"timed out after {timeout:.0f} s waiting for {what}")
            await wait_tick(tick, self.engine.recheck_seconds)

    async def wait_for_operator(self, check: Callable[[], Awaitable[T | None]], *,
                                what: str) -> T:
        """``wait_for(check)`` with the job in the ``waiting`` state meanwhile (an operator
        must confirm something: ``POST /api/v1/jobs/{id}/resume``); running again after."""
        if (found := await check()) is not None:
            return found
        self.job.state, self.job.updated = "waiting", self.core.clock()
        await self.engine.save(self.job, RUNNING)
        log.info("job_waiting", job=self.job.id, kind=self.job.kind, target=self.job.target,
                 waiting_for=what)
        found = await self.wait_for(check, what=what)
        self.job.state, self.job.updated = "running", self.core.clock()
        await self.engine.save(self.job, RUNNING)
        return found


async def wait_tick(tick: asyncio.Event, seconds: float) -> None:
    """Until ``tick`` is set or ``seconds`` pass. (asyncio.timeout, not wait_for: on
    Python 3.11 wait_for can swallow a cancellation that races with the event.)"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await tick.wait()
