"""Routes: replicated items, and enabling/disabling replication (which start jobs)."""

from __future__ import annotations

import structlog
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from configserver import db
from configserver.errors import ItemStateError
from configserver.items import ITEM, ItemState, item_doc
from configserver.jobs import ACTIVE, JOB, job_doc, new_job
from configserver.replication import DISABLE, ENABLE, ENABLE_KINDS
from configserver.rest import NAME, ApiError, Call, Route, array, not_found, obj, reply

log = structlog.get_logger("configserver.items")

JOB_REPLY = obj({"job": JOB}, ["job"])
_MACHINE = {"machine": NAME}


async def list_items(call: Call) -> web.Response:
    q = select(db.ReplicatedItem, db.Policy).outerjoin(
        db.Policy, db.Policy.name == db.ReplicatedItem.policy).order_by(db.ReplicatedItem.machine)
    if "state" in call.query:
        q = q.where(db.ReplicatedItem.state == call.query["state"])
    now = call.services.clock()
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(q)).all()
    return reply({"items": [item_doc(item, policy, now) for item, policy in rows]})


async def show_item(call: Call) -> web.Response:
    name = call.params["machine"]
    async with call.services.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name)
        if item is None:
            raise _no_item(name)
        policy = await s.get(db.Policy, item.policy)
    return reply(item_doc(item, policy, call.services.clock()))


def _no_item(name: str) -> ApiError:
    return ApiError(404, "item_not_found", f"machine {name!r} is not replicated",
                    f"enable replication: siterecovery replication enable {name}")


def _already_disabling(name: str) -> ApiError:
    return ApiError(409, "already_disabling", f"replication of {name!r} is already being "
                    "disabled", f"follow it: siterecovery jobs list --target {name}")


async def enable(call: Call) -> web.Response:
    name: str = call.body["machine"]
    policy_name: str = call.body.get("policy", "default")
    now = call.services.clock()
    async with call.services.sessionmaker() as s:
        machine = await s.get(db.Machine, name)
        if machine is None:
            raise not_found("machine", name, "add it first: siterecovery machine add")
        if not machine.enabled:
            raise ApiError(409, "machine_disabled", f"machine {name!r} is disabled",
                           f"enable it: siterecovery machine update {name} --enable")
        if await s.get(db.Policy, policy_name) is None:
            raise not_found("policy", policy_name, "list policies: siterecovery policy list")
        item = await s.get(db.ReplicatedItem, name)
        if item is not None and item.state != ItemState.ENABLE_FAILED:
            if item.state == ItemState.DISABLING:
                raise ApiError(409, "disabling", f"replication of {name!r} is being disabled",
                               "enable it again once Disable protection has ended: "
                               f"siterecovery jobs list --target {name}")
            if item.state in (ItemState.ENABLING, ItemState.INITIAL_REPLICATION):
                raise ApiError(409, "already_enabling", f"protection of {name!r} is already "
                               f"being enabled (item {item.state})",
                               f"follow it: siterecovery jobs list --target {name}")
            raise ApiError(409, "already_protected", f"machine {name!r} is already "
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
        job = new_job(ENABLE, name, {"policy": policy_name}, now)
        s.add(job)
        try:
            await s.commit()
        except IntegrityError:  # a concurrent enable of the same machine won
            raise ApiError(409, "already_enabling", f"protection of {name!r} is already being "
                           "enabled") from None
    log.info("replication_enable_requested", machine=name, policy=policy_name, job=job.id)
    await call.services.notify()
    return reply({"job": job_doc(job, call.services.jobs.kinds)}, status=202)


async def disable(call: Call) -> web.Response:
    name: str = call.body["machine"]
    async with call.services.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name)
        if item is None:
            raise _no_item(name)
        active = (await s.execute(select(db.Job.id, db.Job.kind).where(
            db.Job.target == name, db.Job.state.in_(ACTIVE)))).all()
        if item.state == ItemState.DISABLING and any(k == DISABLE.name for _, k in active):
            raise _already_disabling(name)
        # (disabling without a Disable protection job: the last one failed; try again)
        enabling = [jid for jid, kind in active if kind in ENABLE_KINDS]
    engine = call.services.jobs
    for jid in enabling:  # a disable supersedes an enable still waiting for the agent
        try:
            await engine.cancel(jid)
        except ItemStateError as e:
            if e.code != "job_finished":
                raise
    now = call.services.clock()
    async with call.services.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name)
        if item is None:
            raise _no_item(name)
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
    await call.services.notify()
    return reply({"job": job_doc(job, call.services.jobs.kinds)}, status=202)


RESYNCABLE = (ItemState.PROTECTED, ItemState.RESYNC_REQUIRED)


async def resync(call: Call) -> web.Response:
    name = call.params["machine"]
    now = call.services.clock()
    async with call.services.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name, with_for_update=True)
        if item is None:
            raise _no_item(name)
        if item.state not in RESYNCABLE:
            raise ApiError(409, "not_resyncable", f"{name!r} is {item.state}: only a protected "
                           "item can be resynchronized",
                           "wait for initial replication or the running resync to finish: "
                           f"siterecovery items show {name}")
        item.state, item.updated = ItemState.RESYNC_REQUIRED, now
        s.add(db.Event(time=now, severity="info", code="resync_requested", target=name,
                       message="resynchronization requested: the agent compares every disk "
                               "with the newest recovery point and sends the differences",
                       active=False))
        await s.commit()
        doc = item_doc(item, await s.get(db.Policy, item.policy), now)
    log.info("resync_requested", machine=name)
    await call.services.notify()
    return reply(doc, status=202)


ROUTES = [
    Route("GET", "/api/v1/items", list_items, "List replicated items", "items",
          query={"state": {"enum": [s.value for s in ItemState]}},
          responses={200: obj({"items": array(ITEM)}, ["items"])}),
    Route("GET", "/api/v1/items/{machine}", show_item, "Show a replicated item", "items",
          params=_MACHINE, responses={200: ITEM}),
    Route("POST", "/api/v1/items/{machine}/resync", resync,
          "Resynchronize a replicated item", "items", params=_MACHINE,
          responses={202: ITEM},
          description="Marks a protected item resync_required. At its next cycle the agent "
                      "compares every disk, block by block, with the fingerprints of the "
                      "newest recovery point in the vault and sends only the blocks that "
                      "differ; the item shows resyncing with progress, then protected. 404 "
                      "for an item that does not exist, 409 unless it is protected."),
    Route("POST", "/api/v1/replication/enable", enable,
          "Enable replication of a machine (starts Enable protection)", "items",
          body=obj({"machine": NAME, "policy": NAME}, ["machine"]),
          responses={202: JOB_REPLY},
          description="Creates the replicated item (state enabling) and queues the Enable "
                      "protection job, which on success queues Finalize protection. 404 for "
                      "an unknown machine or policy; 409 if the machine is already replicated "
                      "or being enabled."),
    Route("POST", "/api/v1/replication/disable", disable,
          "Disable replication of a machine (starts Disable protection)", "items",
          body=obj({"machine": NAME}, ["machine"]), responses={202: JOB_REPLY},
          description="Cancels an Enable/Finalize protection job still running for the "
                      "machine, marks the item disabling and queues Disable protection, which "
                      "removes the item. Recovery points stay in the vault."),
]
