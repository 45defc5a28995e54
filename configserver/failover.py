"""The failover jobs: Test failover, Cleanup test failover, Failover, Change recovery
point, Commit — their steps, built by ``kinds(deps)`` around what they use (the targets
by name, a work folder, the disk check), passed in by the daemon (``jobkinds.py``).

A recovery goes: prerequisites → select the point (``vault.select``) → restore its disks
into ``<work>/<job id>/`` (``vault.restore``) → check them (``FailoverDeps.check_disk``;
"not checked" without one) → create on the target (after removing what an earlier
attempt made) → boot when the target can → record the proof (point, checks, boot, the
measured RTO: from the job's start to booted, or created when the target cannot boot).

What a step learns is written to the item at once (``last_drill`` for drills,
``failover`` for failovers), and every step first reads it back: a step re-run after a
restart (kill -9 included) reuses the point chosen before and replaces what it had made,
so it ends as if it had run once. The item's state was set by the request
(``failoverops.py``); the last step moves it on, and ``on_end`` settles a failed job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import shutil
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.items import ItemState
from configserver.jobdefs import JobKind, JobRun, Step, StepFailed
from configserver.jobs import StepContext
from configserver.recovery import RecoverySettings
from targets.base import BootFailedError, Recovered, RecoveryDisk, Target, TargetError
from vault import names
from vault.errors import VaultError
from vault.keyslots import KeyMaterial, read_keyfile
from vault.locks import LockedError, locked
from vault.repo import Vault
from vault.restore import restore_point
from vault.select import LATEST, select_point
from vault.store.open import open_store

StepFn = Callable[[StepContext], Coroutine[Any, Any, str]]
DRILL, FAILOVER = "last_drill", "failover"  # the item's record each kind writes
LATEST_PROCESSED = "latest-processed"
LOCK_WAIT_SECONDS = 3600.0  # how long a recovery waits for a prune to release the vault
NOT_CHECKED = "not checked"
DiskCheck = Callable[[Path], Any]
"""``targets.verify.check_disk(path)``: checks one restored raw image (partition table,
read-only fsck); its result (or what it awaits to) is recorded on the job and the item;
a result whose ``ok`` is false fails the recovery with the result as the reason."""


@dataclass(frozen=True)
class FailoverDeps:
    targets: Mapping[str, Target]  # by name: folder, libvirt, azure
    work_root: Path  # restored images of each job, under <work_root>/<job id>/
    check_disk: DiskCheck | None = None
    boot_timeout: float = 600.0


# -- the item's record --

async def _item(s: AsyncSession, machine: str) -> db.ReplicatedItem:
    item = await s.get(db.ReplicatedItem, machine)
    if item is None:
        raise StepFailed(f"machine {machine!r} has no replicated item any more")
    return item


async def read(ctx: StepContext, field: str) -> tuple[dict[str, Any], RecoverySettings]:
    async with ctx.core.sessionmaker() as s:
        item = await _item(s, ctx.target)
        return dict(getattr(item, field) or {}), RecoverySettings.stored(item.recovery)


async def record(ctx: StepContext, field: str, *, state: ItemState | None = None,
                 **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the item's ``field`` (and set its state) in one commit."""
    async with ctx.core.sessionmaker() as s:
        item = await _item(s, ctx.target)
        doc = {**(getattr(item, field) or {}), **values}
        setattr(item, field, doc)
        if state is not None:
            item.state = state
        item.updated = ctx.core.clock()
        await s.commit()
    await ctx.core.notify()
    return doc


async def open_vault(ctx: StepContext) -> Vault:
    """The vault this server is registered with, opened with its vault key."""
    async with ctx.core.sessionmaker() as s:
        reg = await s.get(db.Registration, 1)
    if reg is None or not reg.vault_key_file:
        raise StepFailed("this configuration server is not registered with a vault (or has "
                         "no vault key file): siterecovery register --key-file FILE "
                         "--vault-key KEYFILE")
    try:
        km = KeyMaterial(keyfile=await asyncio.to_thread(read_keyfile, reg.vault_key_file))
        return await Vault.open(open_store(reg.vault_url), km)
    except (OSError, ValueError, VaultError) as e:
        raise StepFailed(f"cannot open the vault {reg.vault_url} with the key "
                         f"{reg.vault_key_file}: {e}") from None


def _at(value: Any) -> dt.datetime | None:
    if not value:
        return None
    t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


# -- steps shared by the recoveries --

def steps(field: str, deps: FailoverDeps) -> dict[str, StepFn]:
    """The recovery steps writing the item's ``field`` (drill or failover)."""

    async def prerequisites(ctx: StepContext) -> str:
        rec, settings = await read(ctx, field)
        if settings.target not in deps.targets:
            raise StepFailed(f"recovery target {settings.target!r} is not available on this "
                             f"configuration server (available: {', '.join(deps.targets)}); "
                             f"siterecovery failover settings {ctx.target} --target NAME")
        vault = await open_vault(ctx)
        await vault.close()
        if rec.get("job") != ctx.job.id:  # not a resumed run: a fresh record
            keep: dict[str, Any] = {}
            if field == FAILOVER:  # what runs now is replaced by the new point's machine
                keep = {"recovered": rec.get("recovered"), "history": list(
                    rec.get("history") or []) + ([{"point": rec["point"], "job": rec["job"]}]
                                                 if rec.get("point") else [])}
            fresh: dict[str, Any] = {**dict.fromkeys(rec), **keep, "job": ctx.job.id,
                                     "kind": ctx.job.kind, "result": "running",
                                     "started": ctx.job.started, "target": settings.target,
                                     "vm_name": settings.vm_name or ctx.target}
            await record(ctx, field, **fresh)
        return f"target {settings.target}, VM {settings.vm_name or ctx.target}; vault open"

    async def select(ctx: StepContext) -> str:
        rec, _ = await read(ctx, field)
        if rec.get("point"):  # chosen before a restart: the same point, whatever came since
            return f"point {rec['point']} (chosen before the restart)"
        spec = str(ctx.params.get("point") or LATEST_PROCESSED)
        note = ""
        if spec in (LATEST, LATEST_PROCESSED):
            note = "; draining the process server first ('latest') is not available yet: " \
                   "the newest point the vault holds" if spec == LATEST else ""
            spec = LATEST
        vault = await open_vault(ctx)
        try:
            point = select_point(await vault.list_points(ctx.target), spec,
                                 machine=ctx.target, at=_at(ctx.params.get("at")))
        except VaultError as e:
            raise StepFailed(str(e)) from None
        finally:
            await vault.close()
        await record(ctx, field, point=point.id, point_created=point.created,
                     consistency=point.consistency)
        return f"point {point.id} ({point.consistency}-consistent, {point.created}){note}"

    async def restore(ctx: StepContext) -> str:
        rec, settings = await read(ctx, field)
        work = deps.work_root / ctx.job.id
        vault = await open_vault(ctx)
        try:
            point = await vault.read_point(str(rec["point"]))
            missing = [d for d in settings.disks if d not in {x.disk for x in point.disks}]
            if missing:
                raise StepFailed(f"the point has no disk {', '.join(missing)} (it has "
                                 f"{', '.join(d.disk for d in point.disks)}); change the "
                                 "recovery setting disks")
            await ctx.progress(0.0, f"restoring {len(point.disks)} disk(s) into {work} (after "
                               "a prune of the vault, if one holds its lock)")
            # shared: process servers may go on uploading; a prune (exclusive) may not
            # repack what is being read
            async with locked(vault, "shared", f"restore {ctx.target} ({ctx.job.kind})",
                              wait=LOCK_WAIT_SECONDS):
                done = await restore_point(vault, point, work, disks=settings.disks or None)
        except (LockedError, VaultError) as e:
            raise StepFailed(f"cannot restore point {rec['point']}: {e}") from None
        finally:
            await vault.close()
        order = {d: i for i, d in enumerate(settings.disks)}
        done.sort(key=lambda d: order.get(d.disk, len(order)))
        disks = [{"name": d.disk, "path": d.path, "size": d.size, "digest": d.digest}
                 for d in done]
        await record(ctx, field, work=str(work), disks=disks)
        return f"{len(disks)} disk(s) restored and verified against the point's digests"

    async def verify(ctx: StepContext) -> str:
        rec, _ = await read(ctx, field)
        checks: dict[str, Any] = {}
        for d in rec["disks"]:
            if deps.check_disk is None:
                checks[d["name"]] = NOT_CHECKED
                continue
            result = await asyncio.to_thread(deps.check_disk, Path(d["path"]))
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            checks[d["name"]] = _json(result)
            if getattr(result, "ok", True) is False or \
                    (isinstance(result, dict) and result.get("ok") is False):
                await record(ctx, field, checks=checks)
                raise StepFailed(f"disk {d['name']} failed its checks: {_json(result)}")
        await record(ctx, field, checks=checks)
        if deps.check_disk is None:
            return "disks not checked: the disk checks (targets/verify.py) are not installed"
        return f"{len(checks)} disk(s) checked"

    async def create(ctx: StepContext) -> str:
        rec, settings = await read(ctx, field)
        target = deps.targets[settings.target]
        if rec.get("recovered"):  # an earlier attempt, or the point a change replaces
            await _cleanup(deps, rec["recovered"])
            await record(ctx, field, recovered=None)
        spec = settings.spec(ctx.target, str(rec["point"]), drill=field == DRILL,
                             network=ctx.params.get("network"))
        disks = [RecoveryDisk(d["name"], Path(d["path"]), int(d["size"]))
                 for d in rec["disks"]]
        refusals = await target.check(spec, disks)
        if refusals:
            raise StepFailed("the target refuses the recovery settings: " + "; ".join(
                f"{r.setting}: {r.message}" for r in refusals))
        try:
            made = await target.create(spec, disks)
        except TargetError as e:
            if e.recovered is not None:
                await record(ctx, field, recovered=dataclasses.asdict(e.recovered))
            raise StepFailed(f"{e.message} ({e.code}); {e.hint}") from None
        now = ctx.core.clock()
        await record(ctx, field, recovered=dataclasses.asdict(made), created_at=now,
                     rto_seconds=round(now - (ctx.job.started or now), 3))
        return f"created {made.vm_name} on {made.target}: {', '.join(made.resources)}"

    async def boot(ctx: StepContext) -> str:
        rec, settings = await read(ctx, field)
        target = deps.targets[settings.target]
        try:
            proof = await target.boot(Recovered(**rec["recovered"]), deps.boot_timeout)
        except BootFailedError as e:
            await record(ctx, field, boot={"booted": False, "console_tail": e.console_tail})
            raise StepFailed(f"{e.message}; the console's last lines: "
                             + " | ".join(e.console_tail[-10:])) from None
        if proof is None:
            await record(ctx, field, boot=None)
            return f"the {settings.target} target cannot boot machines: not booted; RTO " \
                   f"{rec['rto_seconds']:.1f} s (to created)"
        rto = round(ctx.core.clock() - (ctx.job.started or 0.0), 3)
        await record(ctx, field, rto_seconds=rto, boot={
            "booted": True, "seconds": proof.seconds, "matched": proof.matched,
            "console_tail": proof.console_tail})
        return f"booted in {proof.seconds:.1f} s ({proof.matched!r}); RTO {rto:.1f} s"

    return {"prerequisites": prerequisites, "select_point": select, "restore": restore,
            "verify": verify, "create": create, "boot": boot}


def _json(result: Any) -> Any:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {k: _json(v) for k, v in dataclasses.asdict(result).items()}
    if isinstance(result, dict):
        return {str(k): _json(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [_json(v) for v in result]
    return result if isinstance(result, (str, int, float, bool)) or result is None \
        else str(result)


async def _cleanup(deps: FailoverDeps, recovered: dict[str, Any]) -> None:
    target = deps.targets.get(str(recovered.get("target")))
    if target is None:
        raise StepFailed(f"what was made is on target {recovered.get('target')!r}, which this "
                         "configuration server no longer has; remove it by hand: "
                         f"{', '.join(recovered.get('resources', []))}")
    try:
        await target.cleanup(Recovered(**recovered))
    except TargetError as e:
        raise StepFailed(f"{e.message} ({e.code}); {e.hint}") from None


def _finish(field: str, state: ItemState, what: str) -> StepFn:
    async def finish(ctx: StepContext) -> str:
        rec, _ = await read(ctx, field)
        if rec.get("work"):  # the target has its own copy (create) and booted it
            await asyncio.to_thread(shutil.rmtree, str(rec["work"]), ignore_errors=True)
        rec = await record(ctx, field, state=state, result="succeeded", work=None,
                           ended=ctx.core.clock())
        return f"{what}; point {rec.get('point')}, RTO {rec.get('rto_seconds')} s"
    return finish


def _recovery(field: str, deps: FailoverDeps, last: Step, *first: Step) -> tuple[Step, ...]:
    s = steps(field, deps)
    return (Step("prerequisites", "Prerequisites check", s["prerequisites"]), *first,
            Step("select_point", "Select the recovery point", s["select_point"]),
            Step("restore", "Restore the disks from the vault", s["restore"]),
            Step("verify", "Check the disks", s["verify"]),
            Step("create", "Create the machine on the target", s["create"]),
            Step("boot", "Boot the machine", s["boot"]), last)


def _on_end(field: str, made_state: ItemState
            ) -> Callable[[AsyncSession, JobRun, str], Awaitable[None]]:
    """Settle the item when a recovery ends other than succeeded (in the transaction that
    ends the job): ``made_state`` if the job may have made something on the target or in
    its work folder (a cleanup or a new attempt must follow), else back to the state the
    request found (replication resumes)."""
    async def on_end(s: AsyncSession, job: JobRun, state: str) -> None:
        if state == "succeeded":
            return
        item = await s.get(db.ReplicatedItem, job.target)
        if item is None:
            return
        rec = dict(getattr(item, field) or {})
        ours = rec.get("job") == job.id
        if ours:
            setattr(item, field, {**rec, "result": state, "error": job.error,
                                  "ended": job.updated})
        before = str(job.params.get("from_state"))
        made = ours and bool(rec.get("work") or rec.get("recovered"))
        item.state = made_state if made or before not in set(ItemState) else ItemState(before)
        item.updated = job.updated
    return on_end


async def _drain_shutdown(ctx: StepContext) -> str:
    if not ctx.params.get("shutdown_source"):
        return "not asked for"
    await record(ctx, FAILOVER, shutdown_source="not available yet")
    return "shutting the source down through its agent is not available yet: going on"


async def _stop_replication(ctx: StepContext) -> str:
    # The request set failover_in_progress, which is not a replicating state: the agent's
    # settings no longer ask it to replicate (what Disable protection does, points kept).
    await record(ctx, FAILOVER, state=ItemState.FAILOVER_IN_PROGRESS)
    return "the agent's settings no longer ask it to replicate; recovery points are kept"


def kinds(deps: FailoverDeps) -> tuple[JobKind, ...]:
    """The failover job kinds bound to ``deps``."""
    async def cleanup_target(ctx: StepContext) -> str:
        rec, _ = await read(ctx, DRILL)
        if rec.get("recovered"):
            await _cleanup(deps, rec["recovered"])
        for work in {str(rec.get("work") or ""), str(deps.work_root / str(rec.get("job")))}:
            if work and rec.get("job"):
                await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)
        made = ", ".join((rec.get("recovered") or {}).get("resources", [])) or "nothing"
        await record(ctx, DRILL, recovered=None, work=None)
        return f"removed {made}"

    async def cleanup_done(ctx: StepContext) -> str:
        await record(ctx, DRILL, state=ItemState.PROTECTED, cleaned=ctx.core.clock(),
                     cleanup_job=ctx.job.id, notes=str(ctx.params.get("notes", "")))
        return "drill cleaned up; the item is protected"

    async def delete_vault_points(ctx: StepContext) -> str:
        vault = await open_vault(ctx)
        try:
            async with locked(vault, "exclusive", f"commit failover of {ctx.target}",
                              wait=LOCK_WAIT_SECONDS):
                points = await vault.list_points(ctx.target)
                for p in points:  # the chains are the machine's own: no other point needs them
                    await vault.store.delete(names.POINTS + p.id)
        except (LockedError, VaultError) as e:
            raise StepFailed(f"cannot delete the points from the vault: {e}") from None
        finally:
            await vault.close()
        return f"{len(points)} point(s) deleted from the vault; their data goes at the next prune"

    async def delete_catalog_points(ctx: StepContext) -> str:
        async with ctx.core.sessionmaker() as s:
            result = await s.execute(delete(db.RecoveryPoint).where(
                db.RecoveryPoint.machine == ctx.target))
            await s.commit()
        n: int = result.rowcount  # type: ignore[attr-defined]
        return f"{n} point(s) removed from the catalog"

    async def committed(ctx: StepContext) -> str:
        await record(ctx, FAILOVER, state=ItemState.COMMITTED, committed=ctx.core.clock(),
                     commit_job=ctx.job.id)
        return "failover committed"

    drill_ended = _on_end(DRILL, ItemState.TEST_FAILOVER_DONE)
    failover_ended = _on_end(FAILOVER, ItemState.FAILOVER_IN_PROGRESS)
    return (
        JobKind("test_failover", "Test failover",
                _recovery(DRILL, deps, Step("record", "Record the drill",
                                            _finish(DRILL, ItemState.TEST_FAILOVER_DONE,
                                                    "drill done"))),
                on_end=drill_ended),
        JobKind("cleanup_test_failover", "Cleanup test failover",
                (Step("cleanup", "Remove what the drill created", cleanup_target),
                 Step("record", "Record the cleanup", cleanup_done))),
        JobKind("failover", "Failover",
                _recovery(FAILOVER, deps,
                          Step("record", "Record the failover",
                               _finish(FAILOVER, ItemState.FAILED_OVER, "failed over")),
                          Step("shutdown_source", "Shut the source machine down",
                               _drain_shutdown),
                          Step("stop_replication", "Stop replication", _stop_replication)),
                cancellable=False, on_end=failover_ended),
        JobKind("change_recovery_point", "Change recovery point",
                _recovery(FAILOVER, deps, Step("record", "Record the new point",
                                               _finish(FAILOVER, ItemState.FAILED_OVER,
                                                       "recovery point changed"))),
                cancellable=False, on_end=failover_ended),
        JobKind("commit_failover", "Commit",
                (Step("delete_vault_points", "Delete the recovery points from the vault",
                      delete_vault_points),
                 Step("delete_catalog_points", "Delete the recovery points from the catalog",
                      delete_catalog_points),
                 Step("record", "Record the commit", committed)),
                cancellable=False),
    )
