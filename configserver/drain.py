"""Leaving no acknowledged data behind: the source's last cycle, and the process server
drained, before a recovery chooses its point.

``shutdown_source`` (Failover with ``shutdown_source``) asks the machine's agent, through
the settings it pulls, for a last delta cycle and a shutdown; the agent answers on
``POST /api/v1/agent/shutdown`` (``configserver/api_agent.py``). An agent that does not
answer in time, or a shutdown that fails, does not stop the failover: the step says so
and the failover goes on.

``drain`` (the point ``latest``) waits until the machine's process server holds no cycle
acknowledged to the agent whose point is not whole in the vault. It reads what the
process server reports with each heartbeat (``pending_cycles``), asks it for an
immediate heartbeat (a refresh: it then heartbeats twice at once), and trusts only the
second heartbeat counted after the request: heartbeats of one process server come one
after another, so that one was computed after the request was made.
"""

from __future__ import annotations

from typing import Any

from configserver import db
from configserver.itemrecord import FAILOVER, read, record
from configserver.jobdefs import StepFailed
from configserver.jobs import StepContext
from configserver.rest import iso


async def shutdown_source(ctx: StepContext, timeout: float) -> str:
    """Ask the agent for a last cycle and a shutdown; wait ``timeout`` seconds (from the
    step's first start) for its answer. Returns what happened, never fails on the agent."""
    if not ctx.params.get("shutdown_source"):
        return "not asked for"
    timeout = float(ctx.params.get("shutdown_timeout_seconds") or timeout)
    rec, _ = await read(ctx, FAILOVER)
    if (rec.get("shutdown") or {}).get("request") != ctx.job.id:
        await record(ctx, FAILOVER, shutdown={"request": ctx.job.id,
                                              "asked": ctx.core.clock()})
    await ctx.progress(0.0, "asking the source's agent for a last cycle and a shutdown "
                            f"(waiting up to {timeout:.0f} s)")

    async def answered() -> dict[str, Any] | None:
        rec, _ = await read(ctx, FAILOVER)
        asked: dict[str, Any] = rec.get("shutdown") or {}
        return asked if asked.get("reported") else None

    try:
        asked = await ctx.wait_for(answered, what="the source's agent", timeout=timeout)
    except StepFailed:
        async with ctx.core.sessionmaker() as s:
            machine = await s.get(db.Machine, ctx.target)
            seen = machine.last_contact if machine is not None else None
        rec, _ = await read(ctx, FAILOVER)
        await record(ctx, FAILOVER, shutdown={**(rec.get("shutdown") or {}),
                                              "result": "no answer"})
        return (f"the source's agent did not answer within {timeout:.0f} s (its last contact "
                f"{iso(seen) if seen else 'never'}): going on without a last cycle; the "
                "source may still be running: shut it down before the recovered machine "
                "takes its place")
    cycle, error = asked.get("cycle"), asked.get("cycle_error")
    await record(ctx, FAILOVER, shutdown={**asked, "result": "shut down" if cycle else
                                          "shut down without a last cycle"})
    if cycle:
        return f"last cycle {cycle} acknowledged; the source is shutting down"
    return (f"the source's last cycle failed ({error}); the source is shutting down, what "
            "it wrote since its last point is not recovered")


async def drain(ctx: StepContext, field: str, timeout: float) -> str:
    """Wait until the machine's process server has put every cycle acknowledged to the
    agent into the vault. Fails after ``timeout`` seconds (from the step's first start)
    with the way out: the point ``latest-processed``."""
    timeout = float(ctx.params.get("drain_timeout_seconds") or timeout)
    rec, _ = await read(ctx, field)
    asked: dict[str, Any] | None = rec.get("drain")
    if not asked:
        async with ctx.core.sessionmaker() as s:
            machine = await s.get(db.Machine, ctx.target)
            name = machine.process_server if machine is not None else None
            ps = await s.get(db.ProcessServer, name, with_for_update=True) if name else None
            if ps is None:
                raise StepFailed(f"machine {ctx.target!r} has no process server to drain "
                                 f"({name or 'none assigned'} is not registered); recover "
                                 "what the vault holds: --point latest-processed")
            ps.refresh_requested = True  # it heartbeats at once, twice
            asked = {"procserver": ps.name, "from": ps.heartbeats, "asked": ctx.core.clock()}
            await s.commit()
        await record(ctx, field, drain=asked)
    name, since = str(asked["procserver"]), int(asked["from"])

    async def drained() -> int | None:
        async with ctx.core.sessionmaker() as s:
            ps = await s.get(db.ProcessServer, name)
        if ps is None:
            raise StepFailed(f"process server {name} was removed while draining it")
        if ps.heartbeats < since + 2:
            await ctx.progress(0.0, f"waiting for process server {name} to report what it "
                                    "still holds")
            return None
        if ps.pending_cycles is None:
            raise StepFailed(f"process server {name} does not report what it still holds "
                             "(an older version): upgrade it, or recover what the vault "
                             "holds: --point latest-processed")
        left = int(ps.pending_cycles.get(ctx.target, 0))
        if left:
            await ctx.progress(50.0, f"waiting for process server {name} to upload {left} "
                                     f"acknowledged cycle(s) of {ctx.target}")
            return None
        return left

    try:
        await ctx.wait_for(drained, what=f"process server {name} to upload what it holds",
                           timeout=timeout)
    except StepFailed as e:
        raise StepFailed(f"{e}; the newest point the vault holds now is "
                         "'--point latest-processed'") from None
    await record(ctx, field, drain={**asked, "drained": ctx.core.clock()})
    return f"process server {name} drained: every acknowledged cycle is in the vault"
