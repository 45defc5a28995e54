"""Process-server failover: the machines of a process server that stopped heartbeating
move to a healthy one, each by a job.

A process server is *dead* once it has not heartbeated for ``procserver_failover_seconds``
(by default the 15 minutes of the ``procserver_heartbeat_missing`` alert, counted like it
from this server's start at the earliest). Every machine with a replicated item assigned
to it then gets a *Move to another process server* job (one per machine and outage: a
machine whose move away from the dead server is under way or was made after its last
heartbeat gets none), whose steps

1. **choose** the least-loaded healthy process server with room
   (``configserver/assignment.py``), assign the machine to it, ask it for a refresh (it
   pulls the machine's policy at once) and record an ``info`` event
   ``machine_moved``; the step's message explains the choice. The other members of the
   machine's consistency group still on the dead server go with it in the same
   transaction (each with its event): a group's barrier is on one process server, so a
   group is never split by a failover (their own move jobs find them moved already).
   No candidate: the step fails with the figures, the machine stays where it was (move
   it by hand: ``siterecovery machine update NAME --process-server PS``);
2. **resync**: wait for the machine's first point made after the move. The agent follows
   through the settings it pulls (their ``process_server``); the new process server does
   not know the agent's base cycle, so the agent's first cycle there is a resync by basis
   against the vault's newest point of the machine (``procserver/basis.py``): only the
   blocks that differ from that point travel, never a full copy while a point exists. The
   step says which it was.

What the dead process server had acknowledged and not yet uploaded stays in its cache; no
other server can read it. The resync sends every block that differs from the newest point
in the vault, so the new process server's first point holds the machine's current data
either way. When the dead server comes back it drains its cache as after any restart:
each such cycle becomes the point it would have been (older than the resync's point, so
the machine's latest point does not move back), and the server then serves the machine no
more: the agent replicates where its settings say, the server pulls no policy for a
machine no longer assigned to it, and its heartbeats stop listing the machine's pending
cycles once they are uploaded.

``run`` looks every ``interval`` seconds and soon after any change (every heartbeat is
one); looks are serialized on this server, and across servers sharing one PostgreSQL
catalog by the dead server's row lock.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import assignment, db, groups, thresholds
from configserver.core import Core, next_pass
from configserver.jobdefs import ACTIVE, JobKind, Step, StepFailed, new_job
from configserver.jobs import StepContext
from configserver.schema import iso

log = structlog.get_logger("configserver.pshealth")
MOVED = "machine_moved"  # the event code
RESYNC_TIMEOUT = 3600.0  # for the first point after the move (server clock)
_MIN_GAP_S = 1.0
_MOVES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = \
    weakref.WeakKeyDictionary()


def _moves_lock() -> asyncio.Lock:
    """One choice at a time on this server (a SQLite catalog has no row locks; across
    servers on PostgreSQL the rows' locks, taken in one order, do it)."""
    return _MOVES.setdefault(asyncio.get_running_loop(), asyncio.Lock())


async def _choose(ctx: StepContext) -> str:
    async with _moves_lock():
        return await _choose_now(ctx)


async def _choose_now(ctx: StepContext) -> str:
    source = str(ctx.params["from"])
    async with ctx.core.sessionmaker() as s:
        group = await groups.fellows(s, ctx.target)
        if group is not None:  # every member's row, in one order: the members' jobs
            await s.execute(select(db.Machine.name).where(  # run at once
                db.Machine.name.in_([ctx.target, *group[1]])).order_by(db.Machine.name)
                .with_for_update())
        machine = await s.get(db.Machine, ctx.target, with_for_update=True)
        if machine is None:
            raise StepFailed(f"machine {ctx.target!r} is no longer in the inventory")
        if machine.process_server != source:
            return (f"the machine is assigned to {machine.process_server or 'no process server'}"
                    f" already (not {source} any more): nothing to move")
        servers = (await s.execute(select(db.ProcessServer))).scalars().all()
        counts = {str(k): int(v) for k, v in (await s.execute(
            select(db.Machine.process_server, func.count()).group_by(
                db.Machine.process_server))).all() if k is not None}
        now = ctx.core.clock()
        # up_since 0: a candidate must have heartbeated lately, whatever our own start.
        choice = assignment.choose(servers, counts, now, 0.0, exclude=[source],
                                   silent_after=float(ctx.params["silent_after"]))
        if choice.server is None:
            raise StepFailed(f"{choice.explanation}; {ctx.target} stays on {source}: start a "
                             "process server, or move it by hand: siterecovery machine "
                             f"update {ctx.target} --process-server NAME")
        target = choice.server
        machine.process_server = target.name
        target.refresh_requested = True  # it pulls the machine's policy at once
        message = (f"{ctx.target} moved from {source} ({ctx.params.get('reason', 'silent')}) "
                   f"to {target.name}; {choice.explanation}")
        message += await _move_fellows(s, ctx.target, source, target.name, now)
        s.add(db.Event(time=now, severity="info", code=MOVED, target=ctx.target,
                       message=message, active=False))
        await s.commit()
    log.info(MOVED, machine=ctx.target, procserver=target.name, was=source, job=ctx.job.id)
    await ctx.core.notify()
    return message


async def _move_fellows(s: AsyncSession, machine: str, source: str, target: str,
                        now: float) -> str:
    """The other members of ``machine``'s consistency group still on ``source`` go to
    ``target`` with it, in the same transaction (a group's barrier is on one process
    server); what the step's message adds of them."""
    group = await groups.fellows(s, machine)
    if group is None:
        return ""
    name, others = group
    moved = []
    for other in others:
        row = await s.get(db.Machine, other, with_for_update=True)
        if row is None or row.process_server != source:
            continue
        row.process_server = target
        moved.append(other)
        s.add(db.Event(time=now, severity="info", code=MOVED, target=other, active=False,
                       message=f"{other} moved from {source} to {target} with {machine}, "
                               f"together with its consistency group {name!r} (one process "
                               "server holds a group's barrier)"))
    if not moved:
        return ""
    log.info(MOVED, machine=",".join(moved), procserver=target, was=source, group=name)
    return (f"; with it, the other members of its consistency group {name!r}: "
            f"{', '.join(moved)}")


async def _resync(ctx: StepContext) -> str:
    moved = float(ctx.job.steps[0].get("ended") or ctx.started)
    timeout = float(ctx.params.get("resync_timeout_seconds") or RESYNC_TIMEOUT)

    async def first_point() -> tuple[str, db.RecoveryPoint] | None:
        async with ctx.core.sessionmaker() as s:
            machine = await s.get(db.Machine, ctx.target)
            item = await s.get(db.ReplicatedItem, ctx.target)
            if machine is None or item is None:
                raise StepFailed(f"{ctx.target} was removed or its replication disabled")
            if item.latest_point is None or (item.latest_point_time or 0.0) <= moved:
                if await s.scalar(select(func.count()).select_from(db.Job).where(
                        db.Job.kind == MOVE.name, db.Job.target == ctx.target,
                        db.Job.state == "queued", db.Job.id != ctx.job.id)):
                    raise StepFailed(f"{machine.process_server} went silent before "
                                     f"{ctx.target}'s first point there; the next move job "
                                     "takes the machine on")
                await ctx.progress(0.0, f"waiting for {ctx.target}'s agent to replicate to "
                                        f"{machine.process_server}")
                return None
            row = await s.get(db.RecoveryPoint, item.latest_point)
            return (str(machine.process_server), row) if row is not None else None

    try:
        server, row = await ctx.wait_for(first_point, what=f"{ctx.target}'s first point after "
                                         "the move", timeout=timeout)
    except StepFailed as e:
        if not str(e).startswith("timed out"):
            raise
        raise StepFailed(f"{e}: is the machine's agent running, and can it reach its new "
                         "process server?") from None
    doc: dict[str, Any] = json.loads(row.doc)
    how = (f"a delta on point {str(doc['base'])[:16]} (resync against the vault)"
           if doc.get("base") else "a full copy (the vault held no usable point)")
    return f"first point on {server}: {row.id[:16]} of {row.created}, {how}"


MOVE = JobKind("move_machine", "Move to another process server", (
    Step("choose", "Choose a healthy process server", _choose),
    Step("resync", "Resume replication on the new process server", _resync),
))
KINDS = (MOVE,)


async def fail_over_once(core: Core, up_since: float,
                         silent_after: float = thresholds.HEARTBEAT_CRITICAL_S) -> list[db.Job]:
    """Queue a move job for every machine of every process server silent for
    ``silent_after`` seconds that has none for this outage yet; the jobs queued."""
    now = core.clock()
    queued: list[db.Job] = []
    async with core.sessionmaker() as s:
        names = (await s.execute(select(db.ProcessServer.name))).scalars().all()
        for name in names:
            ps = await s.get(db.ProcessServer, name, with_for_update=True)
            if ps is None or now - max(ps.last_contact, up_since) < silent_after:
                continue
            machines = (await s.execute(
                select(db.Machine.name).join(db.ReplicatedItem,
                                             db.ReplicatedItem.machine == db.Machine.name)
                .where(db.Machine.process_server == name).order_by(db.Machine.name))
            ).scalars().all()
            if not machines:
                continue
            # Moved, or being moved, away from this server during this outage.
            done = {target for target, params, created, state in (await s.execute(
                select(db.Job.target, db.Job.params, db.Job.created, db.Job.state).where(
                    db.Job.kind == MOVE.name, db.Job.target.in_(machines)))).all()
                if (params or {}).get("from") == name
                and (state in ACTIVE or created >= ps.last_contact)}
            silent = f"no heartbeat since {iso(ps.last_contact)}"
            for m in machines:
                if m not in done:
                    job = new_job(MOVE, m, {"from": name, "reason": silent,
                                           "silent_after": silent_after}, now)
                    s.add(job)
                    queued.append(job)
        await s.commit()
    if queued:
        for job in queued:
            log.warning("procserver_failover_queued", machine=job.target, job=job.id,
                        procserver=job.params["from"], reason=job.params["reason"])
        await core.notify()
    return queued


async def run(core: Core, up_since: float, interval: float, silent_after: float) -> None:
    """Look for dead process servers every ``interval`` seconds and soon after a change
    (at most once a second); ``silent_after`` 0: never (no automatic moves)."""
    if silent_after <= 0:
        log.info("procserver_failover_off", setting="procserver_failover_seconds")
        return
    async with core.notifier.watching("procserver-failover-watch") as dirty:
        while True:
            dirty.clear()
            try:
                await fail_over_once(core, up_since, silent_after)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a catalog hiccup must not end failover
                log.error("procserver_failover_check_failed", error=str(e),
                          error_type=type(e).__name__, retry_in_seconds=interval)
            await next_pass(dirty, min(_MIN_GAP_S, interval), interval)
