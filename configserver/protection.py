"""Enabling, disabling and resynchronizing replication of a machine: the checks and the
catalog changes behind ``POST /api/v1/replication/enable|disable`` and
``POST /api/v1/items/{machine}/resync``.

Enable and disable queue jobs (``configserver/replication.py`` has their steps); a
disable first cancels an Enable/Finalize protection still running for the machine.
Refusals are domain errors: ``NotFound`` (machine, policy or item) and
``ItemStateError`` (the item's state forbids it). Callers notify after a success.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from configserver import db
from configserver.core import Core
from configserver.errors import ItemStateError, NotFound
from configserver.items import ItemState, item_doc
from configserver.jobs import ACTIVE, JobEngine, new_job
from configserver.replication import DISABLE, ENABLE, ENABLE_KINDS

log = structlog.get_logger("configserver.items")

RESYNCABLE = (ItemState.PROTECTED, ItemState.RESYNC_REQUIRED)


def no_item(name: str) -> NotFound:
    return NotFound("item_not_found", f"machine {name!r} is not replicated",
                    f"enable replication: siterecovery replication enable {name}")


def _already_disabling(name: str) -> ItemStateError:
    return ItemStateError("already_disabling", f"replication of {name!r} is already being "
                          "disabled", f"follow it: siterecovery jobs list --target {name}")


async def enable(core: Core, name: str, policy_name: str, site_url: str = "") -> db.Job:
    """Create (or reset a failed) replicated item and queue Enable protection; the job.
    ``site_url``: the site listener as the machine reaches it, for a push install."""
    now = core.clock()
    async with core.sessionmaker() as s:
        machine = await s.get(db.Machine, name)
        if machine is None:
            raise NotFound("machine_not_found", f"no machine named {name!r}",
                           "add it first: siterecovery machine add")
        if not machine.enabled:
            raise ItemStateError("machine_disabled", f"machine {name!r} is disabled",
                                 f"enable it: siterecovery machine update {name} --enable")
        if await s.get(db.Policy, policy_name) is None:
            raise NotFound("policy_not_found", f"no policy named {policy_name!r}",
                           "list policies: siterecovery policy list")
        item = await s.get(db.ReplicatedItem, name)
        if item is not None and item.state != ItemState.ENABLE_FAILED:
            if item.state == ItemState.DISABLING:
                raise ItemStateError("disabling", f"replication of {name!r} is being disabled",
                                     "enable it again once Disable protection has ended: "
                                     f"siterecovery jobs list --target {name}")
            if item.state in (ItemState.ENABLING, ItemState.INITIAL_REPLICATION):
                raise ItemStateError("already_enabling", f"protection of {name!r} is already "
                                     f"being enabled (item {item.state})",
                                     f"follow it: siterecovery jobs list --target {name}")
            raise ItemStateError("already_protected", f"machine {name!r} is already "
                                 f"replicated (item {item.state})",
                                 f"to start over, disable it first: siterecovery replication "
                                 f"disable {name}")
        if item is None:
            item = db.ReplicatedItem(machine=name, created=now)
            s.add(item)
        item.policy, item.state, item.health, item.health_errors = (
            policy_name, ItemState.ENABLING, "normal", [])
        item.initial_progress, item.resync_progress, item.disk_progress = 0.0, None, {}
        item.latest_point = item.latest_point_time = None
        item.latest_app_point = item.latest_app_point_time = None
        item.updated = now
        job = new_job(ENABLE, name, {"policy": policy_name, "site_url": site_url}, now)
        s.add(job)
        try:
            await s.commit()
        except IntegrityError:  # a concurrent enable of the same machine won
            raise ItemStateError("already_enabling", f"protection of {name!r} is already "
                                 "being enabled") from None
    log.info("replication_enable_requested", machine=name, policy=policy_name, job=job.id)
    return job


async def disable(core: Core, jobs: JobEngine, name: str) -> db.Job:
    """Cancel a running Enable/Finalize protection of ``name``, mark its item disabling and
    queue Disable protection; the job."""
    async with core.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name)
        if item is None:
            raise no_item(name)
        active = (await s.execute(select(db.Job.id, db.Job.kind).where(
            db.Job.target == name, db.Job.state.in_(ACTIVE)))).all()
        if item.state == ItemState.DISABLING and any(k == DISABLE.name for _, k in active):
            raise _already_disabling(name)
        # (disabling without a Disable protection job: the last one failed; try again)
        enabling = [jid for jid, kind in active if kind in ENABLE_KINDS]
    for jid in enabling:  # a disable supersedes an enable still waiting for the agent
        try:
            await jobs.cancel(jid)
        except ItemStateError as e:
            if e.code != "job_finished":
                raise
    now = core.clock()
    async with core.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name)
        if item is None:
            raise no_item(name)
        if (await s.execute(select(db.Job.id).where(
                db.Job.target == name, db.Job.state.in_(ACTIVE),
                db.Job.kind == DISABLE.name))).first() is not None:
            raise _already_disabling(name)  # a concurrent disable won
        item.state, item.updated = ItemState.DISABLING, now
        job = new_job(DISABLE, name, {}, now)
        s.add(job)
        await s.commit()
    log.info("replication_disable_requested", machine=name, job=job.id,
             cancelled=list(enabling))
    return job


async def resync(core: Core, name: str) -> dict[str, Any]:
    """Mark a protected item resync_required (the agent's next cycle compares every disk);
    the item's document."""
    now = core.clock()
    async with core.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name, with_for_update=True)
        if item is None:
            raise no_item(name)
        if item.state not in RESYNCABLE:
            raise ItemStateError("not_resyncable", f"{name!r} is {item.state}: only a "
                                 "protected item can be resynchronized",
                                 "wait for initial replication or the running resync to "
                                 f"finish: siterecovery items show {name}")
        item.state, item.updated = ItemState.RESYNC_REQUIRED, now
        s.add(db.Event(time=now, severity="info", code="resync_requested", target=name,
                       message="resynchronization requested: the agent compares every disk "
                               "with the newest recovery point and sends the differences",
                       active=False))
        await s.commit()
        doc = item_doc(item, await s.get(db.Policy, item.policy), now)
    log.info("resync_requested", machine=name)
    return doc
