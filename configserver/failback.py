"""Failback: a planned failover back to the original machine, writing onto its disks only
the blocks that differ from the recovered machine's.

``POST /api/v1/items/{machine}/failback`` (from ``failed_over`` or ``committed``) moves
the item to ``failback_in_progress`` and queues the Failback job:

1. *Prerequisites check*: the recovered machine is on a target failback reads (the
   folder target: its raw images, not running; libvirt: the domain's raw images), shut
   down: a running libvirt domain is asked to shut down (``virsh shutdown``) and waited
   for (``shutdown_timeout_seconds``, else the server's shutdown timeout); one that
   does not stop fails the failback, with nothing written.
2. *Take the recovered machine's disks*: its images are written into the vault as a
   point of the machine (``vault/imagepoint.py``), a delta on the failover point when
   the vault still holds it (the recovered machine started from it), else whole.
3. *Write the differences onto the original machine*: the machine's agent is asked,
   through the settings it pulls (``failback_request``), to write that point onto its
   disks (``mobility/inplace.py``): it compares every block with the point's
   fingerprints, fetches and writes only those that differ, verifies each one and every
   disk's digest, and answers on ``POST /api/v1/agent/failback``.
4. *Remove the recovered machine* from the target — only if its disks are as they were
   taken (each image's size and modification time, recorded at step 2) and, on libvirt,
   its domain is still shut off: a recovered machine started again meanwhile would have
   its new writes removed with it, so the step fails instead, the recovered machine
   stays, and a failback run again takes its disks as they stand.
5. *Record the failback*: the item is ``protected`` again; the agent's base is the
   failback point, so its next cycle is a delta on it (no initial copy).

Nothing the recovered machine wrote is lost: its disks as they stand are the point the
original machine gets. A failback that fails gives the item back to the state it came
from (the original disks may be half written: the agent does not replicate then; run
the failback again, it writes what still differs). A configuration server killed during
it resumes the job at its step: the point taken again is the same one (its cycle is
derived from the job) and the agent is asked with the same request id, so its progress
and its answer (kept by the agent until delivered) reach the restarted server.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.agentwatch import FAILBACK
from configserver.itemrecord import FAILOVER, read, record
from configserver.items import ItemState
from configserver.jobdefs import JobKind, JobRun, Step, StepFailed
from configserver.jobs import StepContext
from configserver.recoveredpoint import recovered_disks, take_point
from configserver.recoverysteps import FailoverDeps, cleanup_recovered
from vault.imagepoint import ImageDisk

TIMEOUT_SECONDS = 6 * 3600.0  # how long the agent may take to answer


def kinds(deps: FailoverDeps) -> tuple[JobKind, ...]:
    """The Failback job kind bound to ``deps``."""

    async def prerequisites(ctx: StepContext) -> str:
        rec, _ = await read(ctx, FAILOVER)
        if (rec.get(FAILBACK) or {}).get("job") != ctx.job.id:  # a fresh run
            await record(ctx, FAILOVER, failback={"job": ctx.job.id,
                                                  "started": ctx.core.clock()})
        images = await recovered_disks(deps, rec, float(
            ctx.params.get("shutdown_timeout_seconds") or deps.shutdown_timeout))
        return ("the recovered machine's disks: "
                + ", ".join(f"{d.name} ({d.path})" for d in images))

    async def take_disks(ctx: StepContext) -> str:
        rec, _ = await read(ctx, FAILOVER)
        fb = dict(rec.get(FAILBACK) or {})
        if fb.get("point"):
            return f"taken before: point {fb['point']}"
        images = await recovered_disks(deps, rec)
        made, base = await take_point(ctx, rec, "failback", images)
        fb.update(point=made.point.id, cycle=made.point.cycle, blocks_stored=made.blocks_stored,
                  full=made.full, images=_at_rest(images))
        await record(ctx, FAILOVER, failback=fb)
        how = "whole (the failover point is gone)" if base is None else \
            f"as a delta on point {base.id}"
        return (f"point {made.point.id}: the recovered machine's disks, {made.blocks_stored} "
                f"block(s) stored {how}")

    async def write_back(ctx: StepContext) -> str:
        rec, _ = await read(ctx, FAILOVER)
        fb = dict(rec.get(FAILBACK) or {})
        if fb.get("request") != ctx.job.id:
            fb.update(request=ctx.job.id, asked=ctx.core.clock())
            await record(ctx, FAILOVER, failback=fb)
        timeout = float(ctx.params.get("timeout_seconds") or TIMEOUT_SECONDS)
        await ctx.progress(0.0, f"asking {ctx.target}'s agent to write point "
                                f"{str(fb['point'])[:16]} onto its disks (only the blocks "
                                "that differ)")

        async def answered() -> dict[str, Any] | None:
            rec, _ = await read(ctx, FAILOVER)
            got: dict[str, Any] = rec.get(FAILBACK) or {}
            if not got.get("reported") and got.get("percent") is not None:
                await ctx.progress(float(got["percent"]), f"{ctx.target}'s agent: "
                                   f"{float(got['percent']):.0f} % compared and written")
            return got if got.get("reported") else None

        got = await ctx.wait_for(answered, what=f"{ctx.target}'s agent", timeout=timeout)
        if got.get("error"):
            raise StepFailed(f"the agent could not write the point onto its disks: "
                             f"{got['error']}")
        return (f"{got.get('blocks_written')} of {got.get('blocks_compared')} block(s) "
                f"differed and were written ({got.get('bytes_written')} bytes); every "
                "disk's digest verified by the agent")

    async def remove_recovered(ctx: StepContext) -> str:
        rec, _ = await read(ctx, FAILOVER)
        fb = dict(rec.get(FAILBACK) or {})
        if rec.get("recovered"):
            # still shut off (else refused) and unchanged since taken; not asked again of
            # a removal under way (a restarted server finds part of it gone)
            taken = None if fb.get("removing") else fb.get("images")
            changed = [] if taken is None else _changed(
                taken, _at_rest(await recovered_disks(deps, rec)))
            if changed:
                raise StepFailed(
                    f"the recovered machine's disks changed after failback took them "
                    f"({', '.join(changed)}): was it started again? Removing it would lose "
                    f"what it wrote since; it is left as it is\nhint: shut it down and run "
                    f"the failback again: it takes the disks as they stand and writes what "
                    f"still differs")
            await record(ctx, FAILOVER, failback={**fb, "removing": True})
            await cleanup_recovered(deps, rec["recovered"])
        made = ", ".join((rec.get("recovered") or {}).get("resources", [])) or "nothing"
        await record(ctx, FAILOVER, recovered=None)
        return f"removed {made}"

    async def done(ctx: StepContext) -> str:
        rec, _ = await read(ctx, FAILOVER)
        fb = {**(rec.get(FAILBACK) or {}), "ended": ctx.core.clock(), "result": "succeeded"}
        more = {"reprotect": {**rec["reprotect"], "ended": fb["ended"]}} \
            if rec.get("reprotect") else {}
        await record(ctx, FAILOVER, state=ItemState.PROTECTED, failback=fb, **more)
        return (f"failed back onto {ctx.target}; replication resumes from point "
                f"{str(fb.get('point'))[:16]} (a delta, no initial copy)")

    return (JobKind("failback", "Failback", (
        Step("prerequisites", "Prerequisites check", prerequisites),
        Step("take_disks", "Take the recovered machine's disks", take_disks),
        Step("write_back", "Write the differences onto the original machine", write_back),
        Step("remove_recovered", "Remove the recovered machine", remove_recovered),
        Step("record", "Record the failback", done)),
        cancellable=False, on_end=_on_end),)


def _at_rest(images: list[ImageDisk]) -> dict[str, list[int]]:
    """Each image's size and modification time (ns): what says it was not written."""
    out: dict[str, list[int]] = {}
    for d in images:
        try:
            st = os.stat(d.path)
            out[d.path] = [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            out[d.path] = [-1, -1]
    return out


def _changed(taken: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
    return sorted(set(taken) ^ set(now) | {p for p in taken if now.get(p) != taken[p]})


async def _on_end(s: AsyncSession, job: JobRun, state: str) -> None:
    """A failback that did not succeed gives the item back to the state it came from."""
    if state == "succeeded":
        return
    item = await s.get(db.ReplicatedItem, job.target)
    if item is None:
        return
    rec = dict(item.failover or {})
    fb = dict(rec.get(FAILBACK) or {})
    if fb.get("job") == job.id:
        rec[FAILBACK] = {**fb, "result": state, "error": job.error, "ended": job.updated}
        item.failover = rec
    before = str(job.params.get("from_state"))
    item.state = ItemState(before) if before in set(ItemState) else ItemState.FAILED_OVER
    item.updated = job.updated
