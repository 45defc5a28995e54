"""The steps of an instant recovery (``failover test|start --instant``): the machine boots
on its disks served over NBD from the vault by this process, then moves onto local
images once they are hydrated, without a reboot (``targets.instant``).

prerequisites (the target can do it) → select the point → create the machine on NBD
disks → check the disks through their servers → boot (the RTO is measured here) →
hydrate: copy what the guest has not read yet, at the job's ``hydrate_rate_mbps``, with
its progress on the step, then pivot; the servers stop.

This process owns the servers for the job's lifetime. Each step after create serves the
disks again first if this process restarted since: the job resumes at its step, and the
servers resume from their overlays (what the guest read and wrote, and what hydration
had copied). While nothing serves them the guest's I/O fails; it never reads other data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

from configserver.itemrecord import DRILL, read, record
from configserver.jobdefs import Step, StepFailed
from configserver.jobs import StepContext
from configserver.recoverysteps import (
    DiskCheck,
    FailoverDeps,
    StepFn,
    cleanup_recovered,
    open_vault,
    steps,
)
from targets.base import Recovered, TargetError
from targets.instant import InstantDisk, InstantSource, InstantTarget, refusal
from targets.instantcheck import check_through_nbd
from vault.errors import VaultError

PROGRESS_SECONDS = 2.0  # how often the hydrate step records its progress


def instant_steps(field: str, deps: FailoverDeps, last: Step, *first: Step
                  ) -> tuple[Step, ...]:
    s = steps(field, deps)
    i = _steps(field, deps)
    return (Step("prerequisites", "Prerequisites check", i["prerequisites"]), *first,
            Step("select_point", "Select the recovery point", s["select_point"]),
            Step("create", "Create the machine on disks served from the vault", i["create"]),
            Step("verify", "Check the disks through their servers", i["verify"]),
            Step("boot", "Boot the machine", i["boot"]),
            Step("hydrate", "Copy the disks from the vault and move the machine onto them",
                 i["hydrate"]), last)


def _target(deps: FailoverDeps, kind: str) -> InstantTarget:
    target = deps.targets.get(kind)
    if not isinstance(target, InstantTarget):
        raise StepFailed(refusal(kind))
    return target


def _source(ctx: StepContext, rec: dict[str, Any]) -> InstantSource:
    return InstantSource(functools.partial(open_vault, ctx), str(rec["point"]))


async def _serve(ctx: StepContext, field: str, deps: FailoverDeps
                 ) -> tuple[InstantTarget, Recovered, dict[str, Any]]:
    """The target and what it made, its disks served (again, after a restart)."""
    rec, settings = await read(ctx, field)
    target = _target(deps, settings.target)
    recovered = Recovered(**rec["recovered"])
    try:
        await target.serve_instant(recovered, _source(ctx, rec))
    except TargetError as e:
        raise StepFailed(f"{e.message} ({e.code}); {e.hint}") from None
    return target, recovered, rec


def _steps(field: str, deps: FailoverDeps) -> dict[str, StepFn]:
    s = steps(field, deps)

    async def prerequisites(ctx: StepContext) -> str:
        msg = await s["prerequisites"](ctx)
        _, settings = await read(ctx, field)
        _target(deps, settings.target)
        return f"{msg}; instant recovery"

    async def create(ctx: StepContext) -> str:
        rec, settings = await read(ctx, field)
        target = _target(deps, settings.target)
        if rec.get("recovered"):  # an earlier attempt, or the point a change replaces
            await cleanup_recovered(deps, rec["recovered"])
            await record(ctx, field, recovered=None)
        vault = await open_vault(ctx)
        try:
            point = await vault.read_point(str(rec["point"]))
        except VaultError as e:
            raise StepFailed(f"cannot read point {rec['point']}: {e}") from None
        finally:
            await vault.close()
        have = {d.disk: d for d in point.disks}
        missing = [d for d in settings.disks if d not in have]
        if missing:
            raise StepFailed(f"the point has no disk {', '.join(missing)} (it has "
                             f"{', '.join(have)}); change the recovery setting disks")
        disks = [InstantDisk(n, have[n].size) for n in settings.disks or list(have)]
        spec = settings.spec(ctx.target, str(rec["point"]), drill=field == DRILL,
                             network=ctx.params.get("network"))
        try:
            made = await target.create_instant(spec, disks, _source(ctx, rec))
        except TargetError as e:
            if e.recovered is not None:
                await record(ctx, field, recovered=dataclasses.asdict(e.recovered),
                             made_by=ctx.job.id)
            raise StepFailed(f"{e.message} ({e.code}); {e.hint}") from None
        now = ctx.core.clock()
        sockets = target.nbd_sockets(made)
        await record(ctx, field, recovered=dataclasses.asdict(made), made_by=ctx.job.id,
                     created_at=now, instant=True,
                     rto_seconds=round(now - (ctx.job.started or now), 3),
                     disks=[{"name": d.name, "path": str(sockets[d.name]), "size": d.size,
                             "digest": None} for d in disks])
        return f"created {made.vm_name} on {made.target} on {len(disks)} disk(s) served " \
               f"from the vault: {', '.join(made.resources)}"

    async def verify(ctx: StepContext) -> str:
        await _serve(ctx, field, deps)
        check = deps.check_disk
        through = None if check is None else functools.partial(_through, check)
        return await steps(field, dataclasses.replace(deps, check_disk=through))["verify"](ctx)

    async def boot(ctx: StepContext) -> str:
        target, recovered, _rec = await _serve(ctx, field, deps)
        msg = await s["boot"](ctx)
        done, total = target.instant_progress(recovered)
        local = round(100.0 * done / max(1, total), 1)
        await record(ctx, field, local_at_boot_percent=local)
        return f"{msg}; {local} % of the stored data local at boot"

    async def hydrate(ctx: StepContext) -> str:
        target, recovered, _rec = await _serve(ctx, field, deps)
        rate = float(ctx.params.get("hydrate_rate_mbps") or 0)
        began = time.monotonic()
        try:
            await _hydrating(ctx, target, recovered, rate)
            _done, total = target.instant_progress(recovered)
            made = await target.pivot_instant(recovered)
        except TargetError as e:
            raise StepFailed(f"{e.message} ({e.code}); {e.hint}") from None
        except VaultError as e:
            raise StepFailed(f"hydration stopped: {e}; what was copied stays: run the "
                             "recovery's cleanup, or fix the vault and run it again") from None
        await record(ctx, field, recovered=dataclasses.asdict(made),
                     hydrated_at=ctx.core.clock())
        images = ", ".join(r.removeprefix("file:") for r in made.resources
                           if r.endswith(".raw"))
        copy = made.details.get("block_copy")
        moved = (f"{made.vm_name} moved onto {images} without a reboot"
                 + (f" (block copy: {copy})" if copy else "")
                 if made.details.get("pivot") == "block copy" else
                 f"{made.vm_name} had stopped: defined on {images}, the hydrated images")
        return (f"{total / 2**20:.1f} MiB hydrated in {time.monotonic() - began:.1f} s "
                f"({'unlimited' if not rate else f'{rate:g} Mbit/s'}); {moved}; its NBD "
                "servers stopped")

    return {"prerequisites": prerequisites, "create": create, "verify": verify,
            "boot": boot, "hydrate": hydrate}


async def _hydrating(ctx: StepContext, target: InstantTarget, recovered: Recovered,
                     rate: float) -> None:
    """Hydrate, recording the progress on the step every ``PROGRESS_SECONDS``."""
    task = asyncio.create_task(target.hydrate_instant(recovered, rate))
    try:
        while True:
            done, total = target.instant_progress(recovered)
            await ctx.progress(100.0 * done / max(1, total),
                               f"hydrating: {done / 2**20:.1f} of {total / 2**20:.1f} MiB "
                               "local")
            finished, _ = await asyncio.wait({task}, timeout=PROGRESS_SECONDS)
            if finished:
                task.result()
                return
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


async def _through(check: DiskCheck, socket: Path) -> Any:
    return await check_through_nbd(socket, check)
