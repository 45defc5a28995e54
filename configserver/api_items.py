"""Routes: replicated items, and enabling/disabling replication (which start jobs; the
checks and changes are in ``configserver/protection.py``)."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select

from configserver import db, install, protection
from configserver.agentversion import with_agent
from configserver.items import ITEM, ItemState, item_doc
from configserver.jobs import JOB, job_doc
from configserver.rest import NAME, Call, Route, array, obj, reply

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
        machines = {m.name: m for m in (await s.scalars(select(db.Machine))).all()}
        servers = {p.name: p for p in (await s.scalars(select(db.ProcessServer))).all()}
    return reply({"items": [with_agent(item_doc(item, policy, now), m := machines.get(item.machine),
                                       servers.get(m.process_server or "") if m else None)
                            for item, policy in rows]})


async def show_item(call: Call) -> web.Response:
    name = call.params["machine"]
    async with call.services.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name)
        if item is None:
            raise protection.no_item(name)
        policy = await s.get(db.Policy, item.policy)
        machine = await s.get(db.Machine, name)
        server = await s.get(db.ProcessServer, machine.process_server) \
            if machine is not None and machine.process_server else None
    return reply(with_agent(item_doc(item, policy, call.services.clock()), machine, server))


async def enable(call: Call) -> web.Response:
    job = await protection.enable(call.services, call.body["machine"],
                                  call.body.get("policy", "default"),
                                  install.site_url(call.services.cfg))
    await call.services.notify()
    return reply({"job": job_doc(job, call.services.jobs.kinds)}, status=202)


async def disable(call: Call) -> web.Response:
    job = await protection.disable(call.services, call.services.jobs, call.body["machine"])
    await call.services.notify()
    return reply({"job": job_doc(job, call.services.jobs.kinds)}, status=202)


async def resync(call: Call) -> web.Response:
    doc = await protection.resync(call.services, call.params["machine"])
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
