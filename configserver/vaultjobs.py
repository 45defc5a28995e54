"""Jobs on the whole vault (target ``vault``: verification, prune): queued by hand or by
an in-daemon schedule, one of a kind at a time, only once the server has its vault key."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from sqlalchemy import select

from configserver import db
from configserver.core import Core
from configserver.jobdefs import ACTIVE, JobKind, new_job

log = structlog.get_logger("configserver.vaultjobs")

TARGET = "vault"


async def request(core: Core, kind: JobKind, params: dict[str, Any], event: str) -> db.Job:
    """Queue ``kind`` on the vault with ``params``; logs ``event``; the job."""
    async with core.sessionmaker() as s:
        job = new_job(kind, TARGET, params, core.clock())
        s.add(job)
        await s.commit()
    await core.notify()
    log.info(event, job=job.id, **params)
    return job


async def schedule_once(core: Core, kind: JobKind, interval_hours: float,
                        params: dict[str, Any], event: str) -> db.Job | None:
    """Queue a scheduled ``kind`` if the server has a vault key, none is active and the
    last one was created ``interval_hours`` ago or more (or never); the job, if any."""
    async with core.sessionmaker() as s:
        reg = await s.get(db.Registration, 1)
        if reg is None or not reg.vault_key_file:
            return None
        last = (await s.execute(select(db.Job).where(db.Job.kind == kind.name)
                                .order_by(db.Job.created.desc()).limit(1))).scalar_one_or_none()
    if last is not None and (last.state in ACTIVE
                             or core.clock() - last.created < interval_hours * 3600):
        return None
    return await request(core, kind, {**params, "scheduled": True}, event)


async def schedule(core: Core, kind: JobKind, interval_hours: float, params: dict[str, Any],
                   event: str, check_seconds: float = 60.0) -> None:
    """The in-daemon schedule: ``schedule_once`` every ``check_seconds`` (0 hours: off)."""
    if interval_hours <= 0:
        return
    while True:
        try:
            await schedule_once(core, kind, interval_hours, params, event)
        except Exception as e:  # a catalog hiccup must not end the schedule
            log.error("vault_job_schedule_failed", kind=kind.name, error=str(e),
                      error_type=type(e).__name__)
        await asyncio.sleep(check_seconds)
