"""Multi-VM consistency groups: machines whose points are taken at one coordinated
moment (the process server's barrier, ``procserver/barrier.py``).

A group has a name, its member machines (a machine is in one group at most), the seconds
between group points (``interval_seconds``) and how long the barrier waits for every
member (``barrier_timeout_seconds``). Every member must be assigned to the same process
server (it holds the barrier); a refusal is a ``DomainError`` naming what is wrong and
what to do. The group points themselves are in ``configserver/grouppoints.py``.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.core import Core
from configserver.errors import Conflict, InvalidRequest, NotFound
from configserver.groupmodels import ConsistencyGroup, GroupMember, GroupPoint
from configserver.jobdefs import active_kinds
from configserver.schema import NAME, array, iso, nullable, obj

log = structlog.get_logger("configserver.groups")

MAX_MEMBERS = 16
DEFAULT_TIMEOUT, MIN_TIMEOUT, MAX_TIMEOUT = 60, 1, 3600
DEFAULT_INTERVAL, MIN_INTERVAL, MAX_INTERVAL = 3600, 10, 7 * 86400

_MEMBERS = {**array(NAME), "minItems": 1, "maxItems": MAX_MEMBERS, "uniqueItems": True,
            "description": "machines (by name), all assigned to one process server"}
_TIMEOUT = {"type": "integer", "minimum": MIN_TIMEOUT, "maximum": MAX_TIMEOUT,
            "description": "how long the process server's barrier waits for every member "
                           f"(default {DEFAULT_TIMEOUT}); a member that does not arrive "
                           "fails that group point"}
_INTERVAL = {"type": "integer", "minimum": MIN_INTERVAL, "maximum": MAX_INTERVAL,
             "description": f"seconds between group points (default {DEFAULT_INTERVAL})"}
CREATE = obj({"name": NAME, "members": _MEMBERS, "barrier_timeout_seconds": _TIMEOUT,
              "interval_seconds": _INTERVAL}, ["name", "members"])
UPDATE = {**obj({"barrier_timeout_seconds": _TIMEOUT, "interval_seconds": _INTERVAL}),
          "minProperties": 1}
MEMBERS_BODY = obj({"machines": _MEMBERS}, ["machines"])
GROUP = obj({"name": {"type": "string"}, "members": array({"type": "string"}),
             "process_server": nullable({"type": "string"}),
             "barrier_timeout_seconds": {"type": "integer"},
             "interval_seconds": {"type": "integer"},
             "last_point": nullable(obj({"id": {"type": "string"},
                                         "state": {"type": "string"},
                                         "created": {"type": "string"}},
                                        ["id", "state", "created"])),
             "job_target": {"type": "string", "description": "the target of its jobs"},
             "last_job": nullable(obj({"id": {"type": "string"}, "kind": {"type": "string"},
                                       "state": {"type": "string"}}, ["id", "kind", "state"])),
             "created": {"type": "string"}, "updated": {"type": "string"}},
            ["name", "members", "process_server", "barrier_timeout_seconds",
             "interval_seconds", "last_point", "job_target", "last_job", "created",
             "updated"])
REFUSALS = (
    "a machine that does not exist: 422 group_machine_unknown",
    "a machine already in another group: 409 group_machine_taken",
    "a machine no process server is assigned to: 422 group_machine_unassigned",
    "members assigned to different process servers: 422 group_process_servers_differ",
    f"more than {MAX_MEMBERS} members: 422 group_too_large",
)


JOB_TARGET = "group:{name}"  # the target of a group's jobs: never a machine's name


def job_target(name: str) -> str:
    return JOB_TARGET.format(name=name)


def no_group(name: str) -> NotFound:
    return NotFound("group_not_found", f"no consistency group named {name!r}",
                    "list them: siterecovery group list")


async def members_of(s: AsyncSession, name: str) -> list[str]:
    return list((await s.execute(select(GroupMember.machine).where(
        GroupMember.group_name == name).order_by(GroupMember.machine))).scalars())


async def _check_members(s: AsyncSession, group: str, members: list[str]) -> None:
    """``DomainError`` unless every machine exists, is in no other group, and all are
    assigned to one process server."""
    if len(members) > MAX_MEMBERS:
        raise InvalidRequest("group_too_large", f"group {group!r} would have "
                             f"{len(members)} members; a group holds at most {MAX_MEMBERS}",
                             "split the application into several groups")
    rows = {m.name: m for m in (await s.execute(select(db.Machine).where(
        db.Machine.name.in_(members)))).scalars()}
    unknown = [m for m in members if m not in rows]
    if unknown:
        raise InvalidRequest("group_machine_unknown", f"group {group!r}: no machine named "
                             f"{', '.join(map(repr, unknown))}",
                             "add it first: siterecovery machine add NAME, or list them: "
                             "siterecovery machine list")
    taken = (await s.execute(select(GroupMember).where(
        GroupMember.machine.in_(members), GroupMember.group_name != group))).scalars().all()
    if taken:
        t = taken[0]
        raise Conflict("group_machine_taken", f"machine {t.machine!r} is in consistency "
                       f"group {t.group_name!r}; a machine is in one group at most",
                       f"remove it there first: siterecovery group remove {t.group_name} "
                       f"{t.machine}")
    unassigned = [m for m in members if not rows[m].process_server]
    if unassigned:
        raise InvalidRequest("group_machine_unassigned", f"group {group!r}: no process "
                             f"server is assigned to {', '.join(map(repr, unassigned))}; "
                             "the group's barrier is held by its members' process server",
                             "enable replication first (siterecovery replication enable "
                             "MACHINE), or assign one: siterecovery machine update MACHINE "
                             "--process-server NAME")
    servers: dict[str, list[str]] = {}
    for m in members:
        servers.setdefault(str(rows[m].process_server), []).append(m)
    if len(servers) > 1:
        said = "; ".join(f"{ps}: {', '.join(ms)}" for ps, ms in sorted(servers.items()))
        raise InvalidRequest("group_process_servers_differ", f"group {group!r}: its members "
                             f"are assigned to different process servers ({said}); all "
                             "members of a group must use one process server, which holds "
                             "the group's barrier",
                             "move them to one: siterecovery machine update MACHINE "
                             "--process-server NAME")


async def _doc(s: AsyncSession, row: ConsistencyGroup) -> dict[str, Any]:
    members = await members_of(s, row.name)
    ps = (await s.execute(select(db.Machine.process_server).where(
        db.Machine.name.in_(members)).limit(1))).scalar() if members else None
    last = (await s.execute(select(GroupPoint).where(GroupPoint.group_name == row.name)
                            .order_by(GroupPoint.created.desc()).limit(1))).scalars().first()
    job = (await s.execute(select(db.Job).where(db.Job.target == job_target(row.name))
                           .order_by(db.Job.id.desc()).limit(1))).scalars().first()
    return {"name": row.name, "members": members, "process_server": ps,
            "barrier_timeout_seconds": row.barrier_timeout_s,
            "interval_seconds": row.interval_s,
            "last_point": None if last is None else {
                "id": last.id, "state": last.state, "created": iso(last.created)},
            "job_target": job_target(row.name),
            "last_job": None if job is None else {"id": job.id, "kind": job.kind,
                                                  "state": job.state},
            "created": iso(row.created), "updated": iso(row.updated)}


async def create(core: Core, body: dict[str, Any]) -> dict[str, Any]:
    name, members = str(body["name"]), [str(m) for m in body["members"]]
    now = core.clock()
    async with core.sessionmaker() as s:
        if await s.get(ConsistencyGroup, name) is not None:
            raise Conflict("group_exists", f"a consistency group named {name!r} exists",
                           f"add machines to it: siterecovery group add {name} MACHINE, or "
                           "choose another name")
        await _check_members(s, name, members)
        row = ConsistencyGroup(
            name=name, created=now, updated=now,
            barrier_timeout_s=int(body.get("barrier_timeout_seconds") or DEFAULT_TIMEOUT),
            interval_s=int(body.get("interval_seconds") or DEFAULT_INTERVAL))
        s.add(row)
        s.add_all(GroupMember(machine=m, group_name=name) for m in members)
        await s.commit()
        doc = await _doc(s, row)
    log.info("group_created", group=name, members=members)
    return doc


async def _stored(s: AsyncSession, name: str) -> ConsistencyGroup:
    row = await s.get(ConsistencyGroup, name, with_for_update=True)
    if row is None:
        raise no_group(name)
    return row


async def _idle(s: AsyncSession, name: str) -> ConsistencyGroup:
    """The group, for a change of its members or its deletion: refused while a job of
    it is queued, running or waiting (a failover's members are the group's when it was
    started, and its group points are what it recovers)."""
    row = await _stored(s, name)
    if await active_kinds(s, job_target(name)):
        raise Conflict("group_job_running", f"a job of consistency group {name!r} is "
                       "queued or running", f"wait for it (siterecovery jobs list --target "
                       f"{job_target(name)} --active), then try again")
    return row


async def update(core: Core, name: str, body: dict[str, Any]) -> dict[str, Any]:
    async with core.sessionmaker() as s:
        row = await _stored(s, name)
        if "barrier_timeout_seconds" in body:
            row.barrier_timeout_s = int(body["barrier_timeout_seconds"])
        if "interval_seconds" in body:
            row.interval_s = int(body["interval_seconds"])
        row.updated = core.clock()
        await s.commit()
        doc = await _doc(s, row)
    log.info("group_updated", group=name, fields=sorted(body))
    return doc


async def add(core: Core, name: str, machines: list[str]) -> dict[str, Any]:
    async with core.sessionmaker() as s:
        row = await _idle(s, name)
        have = await members_of(s, name)
        new = [m for m in machines if m not in have]
        await _check_members(s, name, have + new)
        s.add_all(GroupMember(machine=m, group_name=name) for m in new)
        row.updated = core.clock()
        await s.commit()
        doc = await _doc(s, row)
    log.info("group_members_added", group=name, machines=new)
    return doc


async def remove(core: Core, name: str, machine: str) -> dict[str, Any]:
    async with core.sessionmaker() as s:
        row = await _idle(s, name)
        have = await members_of(s, name)
        if machine not in have:
            raise NotFound("group_member_not_found", f"machine {machine!r} is not in "
                           f"consistency group {name!r}",
                           f"its members: {', '.join(have) or 'none'}")
        await s.execute(delete(GroupMember).where(GroupMember.machine == machine))
        row.updated = core.clock()
        await s.commit()
        doc = await _doc(s, row)
    log.info("group_member_removed", group=name, machine=machine)
    return doc


async def remove_group(core: Core, name: str) -> None:
    """The group, its members' rows and its group points (the members' own points stay)."""
    async with core.sessionmaker() as s:
        row = await _idle(s, name)
        await s.execute(delete(GroupMember).where(GroupMember.group_name == name))
        await s.execute(delete(GroupPoint).where(GroupPoint.group_name == name))
        await s.delete(row)
        await s.commit()
    log.info("group_deleted", group=name)


async def get(core: Core, name: str) -> dict[str, Any]:
    async with core.sessionmaker() as s:
        row = await s.get(ConsistencyGroup, name)
        if row is None:
            raise no_group(name)
        return await _doc(s, row)


async def list_all(core: Core) -> list[dict[str, Any]]:
    async with core.sessionmaker() as s:
        rows = (await s.execute(select(ConsistencyGroup).order_by(
            ConsistencyGroup.name))).scalars().all()
        return [await _doc(s, r) for r in rows]


async def check_move(s: AsyncSession, machine: str, process_server: str | None) -> None:
    """``Conflict`` if ``machine`` is in a group whose other members are assigned to
    another process server than ``process_server`` (a group's barrier is on one)."""
    m = await s.get(GroupMember, machine)
    if m is None:
        return
    others = (await s.execute(select(db.Machine.name, db.Machine.process_server).where(
        db.Machine.name.in_(await members_of(s, m.group_name)),
        db.Machine.name != machine))).all()
    apart = sorted(f"{n} ({ps or 'none'})" for n, ps in others if ps != process_server)
    if apart:
        raise Conflict("group_process_servers_differ", f"machine {machine!r} is in "
                       f"consistency group {m.group_name!r}, whose members {', '.join(apart)} "
                       f"are not on {process_server or 'no process server'}; all members of "
                       "a group must use one process server, which holds the group's barrier",
                       f"move every member together, or take it out of the group first: "
                       f"siterecovery group remove {m.group_name} {machine}")


async def fellows(s: AsyncSession, machine: str) -> tuple[str, list[str]] | None:
    """``machine``'s group and its other members (None: in no group)."""
    m = await s.get(GroupMember, machine)
    if m is None:
        return None
    return m.group_name, [x for x in await members_of(s, m.group_name) if x != machine]


async def group_of(s: AsyncSession, machine: str) -> dict[str, Any] | None:
    """What an agent's settings say of its group (None: in none): the name, the members,
    the interval and the barrier's timeout."""
    m = await s.get(GroupMember, machine)
    if m is None:
        return None
    g = await s.get(ConsistencyGroup, m.group_name)
    if g is None:
        return None
    return {"name": g.name, "members": await members_of(s, g.name),
            "interval_seconds": g.interval_s, "barrier_timeout_seconds": g.barrier_timeout_s}
