"""Re-protect: the recovered machine replicated into the same vault, as a new direction
of the same item, without a full copy.

``POST /api/v1/items/{machine}/reprotect`` (from ``failed_over``, ``committed`` or
``reprotected``) queues the Re-protect job: the recovered machine's disks, read on the
host from the target (the folder target's raw images; a libvirt domain's raw images
while it is shut off, a running one refused unless it is read paused (``pause``) or
copied at one moment while it runs on (``live``): ``configserver/recoveredpoint.py``), are
written into the vault as a point of the machine — a delta on the failover point the
recovered machine started from (or on the last point a re-protect took), so the first
cycle costs the blocks written since, not a full copy; whole only after a commit deleted
the failover's points. The item ends ``reprotected``, its ``direction``
``reverse``; each further Re-protect takes the next delta, and Failback starts from the
newest, so what it still has to take is small.

``agent`` (``reprotect --agent``): the recovered machine's own Mobility agent replicates
it instead, continuously, as the original did — any target, nothing read on the host.
The agent came with the disks; the configuration server tells it from the original's by
the host id it reports (configserver/hostroles.py) and lets it replicate: its first
cycle is a resync by basis on the point the machine started from (only the blocks
written since are sent), then deltas. The step ends at its first point; every later one
becomes the re-protect's newest, which Failback starts from. A host-read Re-protect
afterwards stops the agent's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.itemrecord import FAILOVER, read, record
from configserver.items import ItemState
from configserver.jobdefs import JobKind, JobRun, Step
from configserver.jobs import StepContext
from configserver.recoveredpoint import (
    live_copies,
    paused_for_read,
    recovered_disks,
    take_point,
)
from configserver.recoverysteps import FailoverDeps

REPROTECT = "reprotect"  # the reverse direction's record, inside the item's failover record
AGENT_WAIT_SECONDS = 24 * 3600.0  # how long a re-protect waits for the agent's first point


def kinds(deps: FailoverDeps) -> tuple[JobKind, ...]:
    """The Re-protect job kind bound to ``deps`` (the targets its disks are read from)."""

    async def prerequisites(ctx: StepContext) -> str:
        rec, _ = await read(ctx, FAILOVER)
        if ctx.params.get("agent"):
            seen = rec.get("recovered_agent") or {}
            return ("through the agent in the recovered machine: " + (
                f"host {seen.get('host_id') or '(no host id)'} checked in"
                if seen.get("last_contact") is not None else
                "it has not checked in yet (it needs the configuration server's site "
                "listener and its process server in reach)"))
        images = await recovered_disks(deps, rec, paused_ok=bool(
            ctx.params.get("pause") or ctx.params.get("live")))
        return ("the recovered machine's disks, read on the host: "
                + ", ".join(f"{d.name} ({d.path})" for d in images))

    async def take(ctx: StepContext) -> str:
        rec, _ = await read(ctx, FAILOVER)
        rp = dict(rec.get(REPROTECT) or {})
        if rp.get("last_job") == ctx.job.id:
            return f"taken before: point {rp.get('last_point')}"
        if ctx.params.get("agent"):
            return await _through_agent(ctx, rp)
        pause, live = bool(ctx.params.get("pause")), bool(ctx.params.get("live"))
        if pause:  # recorded first: a run resumed after a kill -9 resumes the domain too
            await record(ctx, FAILOVER, reprotect={**rp, "pausing": ctx.job.id})
        started = time.monotonic()
        copied = False
        if live:  # a copy left by a killed run of this step is ended and made again
            async with live_copies(deps, rec, ctx) as copies:
                copied = copies is not None
                made, base = await take_point(
                    ctx, rec, "reprotect",
                    copies if copies is not None else await recovered_disks(deps, rec))
            paused = False
        else:
            async with paused_for_read(deps, rec, rp.get("pausing") == ctx.job.id) \
                    if pause else _nothing() as paused:
                made, base = await take_point(ctx, rec, "reprotect",
                                              await recovered_disks(deps, rec, paused_ok=pause))
        held = time.monotonic() - started
        now = ctx.core.clock()
        rp.update(direction="reverse", started=rp.get("started") or now, last_job=ctx.job.id,
                  last_point=made.point.id, last_blocks_stored=made.blocks_stored,
                  last_full=made.full, points=int(rp.get("points") or 0) + 1, updated=now,
                  ended=None, pausing=None, via="host",
                  last_paused_seconds=round(held, 3) if paused else None,
                  last_live=copied)
        await record(ctx, FAILOVER, reprotect=rp)
        how = "whole (the failover point is gone: the first re-protect after a commit)" \
            if base is None else f"as a delta on point {base.id}"
        note = (f"; read paused ({held:.1f} s: crash-consistent)" if paused else
                f"; copied while it ran ({held:.1f} s, the guest never paused: "
                "crash-consistent)" if copied else "")
        return (f"point {made.point.id}: {made.blocks_stored} block(s) stored {how}{note}")

    async def done(ctx: StepContext) -> str:
        await record(ctx, FAILOVER, state=ItemState.REPROTECTED)
        return "re-protected: the recovered machine's disks are in the vault (direction reverse)"

    return (JobKind("reprotect", "Re-protect", (
        Step("prerequisites", "Prerequisites check", prerequisites),
        Step("take", "Replicate the recovered machine's disks", take),
        Step("record", "Record the re-protect", done)), on_end=_on_end),)


async def _through_agent(ctx: StepContext, rp: dict[str, Any]) -> str:
    """Let the recovered machine's agent replicate; done at its first point."""
    if rp.get("agent_job") != ctx.job.id:
        rp.update(direction="reverse", via="agent", agent_job=ctx.job.id, ended=None,
                  via_before=rp.get("via"), points_before=int(rp.get("points") or 0),
                  started=rp.get("started") or ctx.core.clock(), pausing=None)
        await record(ctx, FAILOVER, reprotect=rp)
    before = int(rp["points_before"])

    async def first_point() -> dict[str, Any] | None:
        rec, _ = await read(ctx, FAILOVER)
        now = dict(rec.get(REPROTECT) or {})
        return now if int(now.get("points") or 0) > before else None
    await ctx.progress(0.0, "waiting for the first point from the agent in the recovered "
                            "machine (a resync on the point it started from)")
    got = await ctx.wait_for(first_point, timeout=float(ctx.params.get("wait_seconds")
                                                        or AGENT_WAIT_SECONDS),
                             what="a point from the agent in the recovered machine")
    got.update(last_job=ctx.job.id, updated=ctx.core.clock())
    await record(ctx, FAILOVER, reprotect=got)
    how = "whole" if got.get("last_full") else "a delta (only the blocks written since)"
    return (f"point {got['last_point']} from the agent in the recovered machine, {how}; "
            "it goes on replicating until a failback")


@asynccontextmanager
async def _nothing() -> AsyncIterator[bool]:
    yield False


async def _on_end(s: AsyncSession, job: JobRun, state: str) -> None:
    """A Re-protect that did not succeed leaves the item as it found it."""
    if state == "succeeded":
        return
    item = await s.get(db.ReplicatedItem, job.target)
    if item is None:
        return
    before = str(job.params.get("from_state"))
    if before in set(ItemState):
        item.state = ItemState(before)
        item.updated = job.updated
    rec = dict(item.failover or {})
    rp = dict(rec.get(REPROTECT) or {})
    if rp.get("agent_job") == job.id and rp.get("via") == "agent" and \
            int(rp.get("points") or 0) == int(rp.get("points_before") or 0):
        # The agent made no point: it stops replicating unless it did before this job.
        rp["via"] = rp.get("via_before")
        item.failover = {**rec, REPROTECT: rp}
