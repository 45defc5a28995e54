"""The recovery steps a failover job is made of, and the item's record they keep.

A recovery goes: prerequisites → select the point (``vault.select``) → restore its disks
into ``<work>/<job id>/`` (``vault.restore``, under a shared vault lock) → check them
(``FailoverDeps.check_disk``) → create on the target (after removing what an earlier
attempt made) → boot when the target can. ``steps(field, deps)`` gives them for one
record of the item: ``last_drill`` (drills) or ``failover``.

What a step learns is written to that record at once, and every step first reads it
back: a step re-run after a restart (kill -9 included) reuses the point chosen before
and replaces what it had made, so it ends as if it had run once. What the target's
``create`` may make is recorded (``planned``) before it runs, so a create killed or
cancelled part way leaves nothing that cleanup does not know of. The measured RTO is
from the job's start (kept across restarts) to booted, or to created when the target
cannot boot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configserver import db
from configserver.drain import drain
from configserver.itemrecord import DRILL, FAILOVER, read, record
from configserver.items import last_good_drill
from configserver.jobdefs import StepFailed
from configserver.jobs import StepContext
from targets.base import (
    BootFailedError,
    Recovered,
    RecoveryDisk,
    Refusal,
    Target,
    TargetError,
)
from vault.errors import VaultError
from vault.keyslots import KeyMaterial, read_keyfile
from vault.locks import LockedError, locked
from vault.manifestcache import ManifestCache
from vault.repo import Vault
from vault.restore import restore_point
from vault.select import LATEST, select_point
from vault.store.open import open_store

StepFn = Callable[[StepContext], Coroutine[Any, Any, str]]
LATEST_PROCESSED = "latest-processed"
LOCK_WAIT_SECONDS = 3600.0  # how long a recovery waits for a prune to release the vault
NOT_CHECKED = "not checked"
DiskCheck = Callable[[Path], Awaitable[Any]]
"""Checks one restored raw image (``targets.verify.verify_image``: partition table,
read-only fsck). Its result is recorded on the job and the item; a result whose ``ok``
is false, or a ``TargetError``, fails the recovery with the findings as the reason."""


@dataclass(frozen=True)
class FailoverDeps:
    targets: Mapping[str, Target]  # by name: folder, libvirt, azure
    work_root: Path  # restored images of each job, under <work_root>/<job id>/
    check_disk: DiskCheck | None = None
    boot_timeout: float = 600.0
    drain_timeout: float = 1800.0  # the point 'latest': the process server's upload
    shutdown_timeout: float = 600.0  # the source's agent: a last cycle and its shutdown
    # The point manifests the jobs' vault objects opened, shared: the drills or failovers
    # of a plan's items select their points at once, reading each manifest once between
    # them, and a later job reads only what changed (vault/manifestcache.py).
    manifests: ManifestCache = dataclasses.field(default_factory=ManifestCache)


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
        if rec.get("job") != ctx.job.id:  # not a resumed run: a fresh record
            keep: dict[str, Any] = {}
            if field == FAILOVER:  # what runs now is replaced by the new point's machine
                keep = {"recovered": rec.get("recovered"), "planned": rec.get("planned"),
                        "history": list(
                    rec.get("history") or []) + ([{"point": rec["point"], "job": rec["job"]}]
                                                 if rec.get("point") else [])}
            else:  # a drill that fails must not erase the last good one (drill freshness)
                keep = {"last_success": last_good_drill(rec)}
            fresh: dict[str, Any] = {**dict.fromkeys(rec), **keep, "job": ctx.job.id,
                                     "kind": ctx.job.kind, "result": "running",
                                     "started": ctx.job.started, "target": settings.target,
                                     "vm_name": settings.vm_name or ctx.target}
            await record(ctx, field, **fresh)
        if settings.target not in deps.targets:
            raise StepFailed(f"recovery target {settings.target!r} is not available on this "
                             f"configuration server (available: {', '.join(deps.targets)}); "
                             f"siterecovery failover settings {ctx.target} --target NAME")
        vault = await open_vault(ctx)
        await vault.close()
        return f"target {settings.target}, VM {settings.vm_name or ctx.target}; vault open"

    async def select(ctx: StepContext) -> str:
        rec, settings = await read(ctx, field)
        if rec.get("point"):  # chosen before a restart: the same point, whatever came since
            return f"point {rec['point']} (chosen before the restart)"
        spec = str(ctx.params.get("point") or LATEST_PROCESSED)
        note = ""
        if spec == LATEST:  # nothing acknowledged left behind: wait for the upload
            note = "; " + await drain(ctx, field, deps.drain_timeout)
        elif spec == LATEST_PROCESSED:
            spec = LATEST  # the vault's newest, as it is now
        vault = await open_vault(ctx)
        vault.manifests = deps.manifests
        try:
            point = select_point(await vault.list_points(ctx.target), spec,
                                 machine=ctx.target, at=_at(ctx.params.get("at")))
        except VaultError as e:
            raise StepFailed(str(e)) from None
        finally:
            await vault.close()
        # the target's requirements before hours of restoring: the disks as they will be
        planned = [RecoveryDisk(d.disk, deps.work_root / ctx.job.id / f"{d.disk}.img", d.size)
                   for d in point.disks if not settings.disks or d.disk in settings.disks]
        _accept(await deps.targets[settings.target].check(
            settings.spec(ctx.target, point.id, drill=field == DRILL,
                          network=ctx.params.get("network")), planned))
        await record(ctx, field, point=point.id, point_created=point.created,
                     consistency=point.consistency)
        return f"point {point.id} ({point.consistency}-consistent, {point.created}); the " \
               f"target accepts its {len(planned)} disk(s){note}"

    async def restore(ctx: StepContext) -> str:
        rec, settings = await read(ctx, field)
        work = deps.work_root / ctx.job.id
        await record(ctx, field, work=str(work))  # before a byte is written: cleanup finds it
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
        found: list[str] = []
        for d in rec["disks"]:
            if deps.check_disk is None:
                checks[d["name"]] = NOT_CHECKED
                continue
            await ctx.progress(100.0 * len(checks) / len(rec["disks"]),
                               f"checking disk {d['name']}")
            try:
                result = await deps.check_disk(Path(d["path"]))
            except TargetError as e:
                checks[d["name"]] = {"ok": False, "error": e.message, "hint": e.hint}
                found.append(f"disk {d['name']}: {e.message} ({e.hint})")
                continue
            ok = getattr(result, "ok", True) is not False
            checks[d["name"]] = {"ok": ok, **_json(result)} if dataclasses.is_dataclass(
                result) else _json(result)
            if not ok:
                found.append(f"disk {d['name']}: {_findings(result)}")
        await record(ctx, field, checks=checks)
        if found:
            raise StepFailed("the restored disks failed their checks: " + "; ".join(found))
        if deps.check_disk is None:
            return "disks not checked: this server has no disk check"
        return f"{len(checks)} disk(s) checked: " + "; ".join(
            f"{name}: {_summary(c)}" for name, c in checks.items())

    async def create(ctx: StepContext) -> str:
        rec, settings = await read(ctx, field)
        target = deps.targets[settings.target]
        if rec.get("recovered"):  # an earlier attempt, or the point a change replaces
            await cleanup_recovered(deps, rec["recovered"])
            await record(ctx, field, recovered=None)
        ours = rec.get("planned") if rec.get("made_by") == ctx.job.id else None
        if rec.get("planned") and not ours:
            # what another job's create began and never finished (a failed failover): this
            # job's own interrupted create is the target's to continue (create again)
            await cleanup_recovered(deps, rec["planned"])
            await record(ctx, field, planned=None)
        spec = settings.spec(ctx.target, str(rec["point"]), drill=field == DRILL,
                             network=ctx.params.get("network"))
        disks = [RecoveryDisk(d["name"], Path(d["path"]), int(d["size"]))
                 for d in rec["disks"]]
        _accept(await target.check(spec, disks))
        # named before it runs: a create killed or cancelled part way is cleaned up too
        await record(ctx, field, planned=dataclasses.asdict(target.planned(spec, disks)),
                     made_by=ctx.job.id)
        try:
            made = await target.create(spec, disks)
        except TargetError as e:
            # what it had made is on the error; none named: it made nothing (a refusal,
            # another recovery's machine in the way), which cleanup must then not touch —
            # unless this job's create ran before (killed): what is in the way is its own
            await record(ctx, field, planned=ours, recovered=dataclasses.asdict(e.recovered)
                         if e.recovered is not None else None)
            raise StepFailed(f"{e.message} ({e.code}); {e.hint}") from None
        now = ctx.core.clock()
        await record(ctx, field, recovered=dataclasses.asdict(made), planned=None,
                     made_by=ctx.job.id, created_at=now,
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


def _accept(refusals: list[Refusal]) -> None:
    if refusals:
        raise StepFailed("the target refuses the recovery: " + "; ".join(
            f"{r.setting}: {r.message}" for r in refusals))


def _findings(result: Any) -> str:
    """What a failed check found: each damaged filesystem with its checker's last lines."""
    damaged = getattr(result, "damaged", None) or []
    return "; ".join(f"partition {c.partition.number} ({c.fs}) {c.status}: "
                     + " | ".join(c.output_tail[-5:]) for c in damaged) or str(result)


def _summary(check: Any) -> str:
    if not isinstance(check, dict) or "checks" not in check:
        return str(check)
    return ", ".join(f"{c['fs']} {c['status']}" for c in check["checks"]) or "no filesystem"


def _json(result: Any) -> Any:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {k: _json(v) for k, v in dataclasses.asdict(result).items()}
    if isinstance(result, dict):
        return {str(k): _json(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [_json(v) for v in result]
    return result if isinstance(result, (str, int, float, bool)) or result is None \
        else str(result)


async def cleanup_recovered(deps: FailoverDeps, recovered: dict[str, Any]) -> None:
    """Remove what a recovery made (a ``Recovered`` as recorded); idempotent, as the
    target's ``cleanup`` is. A target this server no longer has fails the step."""
    target = deps.targets.get(str(recovered.get("target")))
    if target is None:
        raise StepFailed(f"what was made is on target {recovered.get('target')!r}, which this "
                         "configuration server no longer has; remove it by hand: "
                         f"{', '.join(recovered.get('resources', []))}")
    try:
        await target.cleanup(Recovered(**recovered))
    except TargetError as e:
        raise StepFailed(f"{e.message} ({e.code}); {e.hint}") from None
