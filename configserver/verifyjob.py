"""The Verify recovery points job: proves the vault's retained points restore to their
recorded digests (``configserver/verification.py``), keeps each point's last result in
``point_verifications``, and tells operators about damage: an alert per machine naming
the damaged objects (``point_verification_failed``, critical, cleared when its points
verify again or are gone), the item's health, and metrics.

Jobs run on the target ``vault`` (one verification at a time; a scheduled prune shares
the target, so the two never race). Parameters: ``machine`` (only its points; default
every machine), ``all`` (every point, not only those due), ``reverify_days`` and
``daily_share`` (percent) for what is due (``verification.due``), ``memory_mib`` (the
server's ``gc_memory_mib`` when queued) and ``index_dir`` (``<data_dir>/verify-index``:
the vault's index past that budget, kept between runs). A scheduled run
(``schedule``) is queued every ``verify_interval_hours`` when none is active.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import delete, select

from configserver import db, vaultjobs
from configserver.core import Core
from configserver.jobdefs import JobKind, Step, StepFailed
from configserver.jobs import StepContext
from configserver.models import PointVerification
from configserver.notifyoutbox import CLEARED, RAISED, Change, enqueue
from configserver.recoverysteps import open_vault
from configserver.verification import DAY, Damage, PointResult, due, verify_points
from vault import names
from vault.errors import VaultError
from vault.locks import LockedError
from vault.memory import budget_bytes

log = structlog.get_logger("configserver.verify")
TARGET = vaultjobs.TARGET
ALERT = "point_verification_failed"
HEALTH_PREFIX = "recovery point verification failed"


async def _verify(ctx: StepContext) -> str:
    machine = ctx.params.get("machine") or None
    try:  # queued before the setting existed: in memory, as then
        memory = (None if ctx.params.get("memory_mib") is None
                  else budget_bytes(ctx.params["memory_mib"]))
    except ValueError as e:
        raise StepFailed(f"{e} (the job's memory_mib; set gc_memory_mib in "
                         "configserver.toml)") from None
    vault = await open_vault(ctx)
    try:
        scan = await vault.scan_points(machine)
        async with ctx.core.sessionmaker() as s:
            last = {r.point_id: r.verified for r in (await s.execute(
                select(PointVerification))).scalars().all()}
        now = ctx.core.clock()
        chosen = list(scan.points) if ctx.params.get("all") else due(
            scan.points, last, now, reverify_days=float(ctx.params.get("reverify_days", 30)),
            daily_share=float(ctx.params.get("daily_share", 100)))
        await ctx.progress(0.0, f"verifying {len(chosen)} of {len(scan.points)} point(s)")
        results = await verify_points(vault, chosen, None, clock=ctx.core.clock,
                                      progress=_progress(ctx, len(chosen)), memory=memory,
                                      index_dir=ctx.params.get("index_dir") or None)
    except LockedError as e:
        raise StepFailed(f"the vault is locked: {e}") from None
    except VaultError as e:
        raise StepFailed(f"cannot read the vault: {e}") from None
    finally:
        await vault.close()
    # A manifest that does not authenticate is a failed point too (its machine unknown).
    for name, err in scan.damaged:
        pid = name[len(names.POINTS):]
        results.append(PointResult(pid, "", "", ctx.core.clock(),
                                   damaged=[Damage(name, err.reason)]))
    await record(ctx.core, results, [(p.id, p.machine) for p in scan.points] + [
        (n[len(names.POINTS):], "") for n, _ in scan.damaged], machine,
        reverify_days=float(ctx.params.get("reverify_days", 30)))
    bad = [r for r in results if not r.ok]
    done = (f"{len(results) - len(bad)} point(s) verified of {len(scan.points)} retained"
            f"{'' if machine is None else f' of {machine}'}")
    if bad:
        objs = sorted({o for r in bad for o in r.objects})
        raise StepFailed(f"{done}; {len(bad)} FAILED: " + "; ".join(
            f"points/{r.point} ({', '.join(r.objects)})" for r in bad[:5])
            + f"; damaged objects: {', '.join(objs[:10])}; run 'siterecovery check "
            "--read-data' on the vault for the whole picture")
    return done


def _progress(ctx: StepContext, count: int) -> Any:
    """A sync progress callback that records whole percents as the bytes are read."""
    pending: set[asyncio.Task[None]] = set()
    shown = [-1]

    def cb(done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        if pct != shown[0] and not pending:  # at most one write in flight
            shown[0] = pct
            t = asyncio.ensure_future(ctx.progress(pct, f"verifying {count} point(s): "
                                                        f"{done} of {total} bytes of disks"))
            pending.add(t)
            t.add_done_callback(pending.discard)
    return cb


async def record(core: Core, results: Sequence[PointResult],
                 retained: Sequence[tuple[str, str]], machine: str | None, *,
                 reverify_days: float) -> None:
    """Store ``results``, forget the rows of points no longer ``retained`` (point id and
    machine, of ``machine`` or all), then bring alerts, item health and metrics in line
    with the table (``reverify_days``: the unverified-points metric)."""
    keep = {pid for pid, _ in retained}
    async with core.sessionmaker() as s:
        for r in results:
            row = await s.get(PointVerification, r.point)
            if row is None:
                row = PointVerification(point_id=r.point)
                s.add(row)
            row.machine = r.machine or row.machine or ""
            row.verified, row.ok = r.verified, r.ok
            row.damaged = [d.to_json() for d in r.damaged]
        await s.flush()
        gone = select(PointVerification.point_id).where(
            PointVerification.point_id.not_in(keep))
        if machine is not None:
            gone = gone.where(PointVerification.machine == machine)
        await s.execute(delete(PointVerification).where(
            PointVerification.point_id.in_(gone.scalar_subquery())))
        await s.commit()
        when = {r.point_id: r.verified for r in (await s.execute(
            select(PointVerification))).scalars().all()}
    unverified: dict[str, int] = {}
    for pid, m in retained:
        stale = pid not in when or core.clock() - when[pid] >= reverify_days * DAY
        unverified[m or "vault"] = unverified.get(m or "vault", 0) + int(stale)
    for m, n in unverified.items():
        core.metrics.verify_unverified.labels(m).set(n)
    await refresh(core)


async def refresh(core: Core) -> None:
    """Alerts, item health and metrics from ``point_verifications`` as it stands."""
    now = core.clock()
    changed = False
    notices: list[Change] = []
    async with core.sessionmaker() as s:
        rows = (await s.execute(select(PointVerification))).scalars().all()
        failing: dict[str, list[PointVerification]] = {}
        for r in rows:
            if not r.ok:
                failing.setdefault(r.machine or "vault", []).append(r)
        active = {ev.target: ev for ev in (await s.execute(select(db.Event).where(
            db.Event.active.is_(True), db.Event.code == ALERT))).scalars().all()}
        for target, ev in active.items():
            if target not in failing:
                ev.active, ev.cleared_at = False, now
                changed = True
                notices.append(Change(CLEARED, ALERT, target, ev.severity, ev.message))
                log.info("alert_cleared", code=ALERT, target=target, severity="critical")
        for target, bad in failing.items():
            msg = alert_message(target, bad)
            if target in active:
                active[target].message = msg
                continue
            s.add(db.Event(time=now, severity="critical", code=ALERT, target=target,
                           message=msg, active=True, cleared_at=None))
            notices.append(Change(RAISED, ALERT, target, "critical", msg))
            changed = True
            log.error("alert_raised", code=ALERT, target=target, severity="critical",
                      message=msg)
        for item in (await s.execute(select(db.ReplicatedItem))).scalars().all():
            errors = [e for e in (item.health_errors or []) if not e.startswith(HEALTH_PREFIX)]
            if item.machine in failing:
                errors.append(f"{HEALTH_PREFIX}: " + alert_message(item.machine,
                                                                    failing[item.machine]))
            if errors != list(item.health_errors or []):
                item.health_errors = errors
                item.health = "critical" if item.machine in failing else (
                    "normal" if not errors else item.health)
                item.updated = now
                changed = True
        # In the transaction of the event rows: a notice exists exactly when its event does.
        await enqueue(s, now, notices)
        await s.commit()
    _metrics(core, rows)
    if changed:
        await core.notify()


def alert_message(machine: str, bad: Sequence[PointVerification]) -> str:
    objs = sorted({str(d["object"]) for r in bad for d in r.damaged})
    pts = ", ".join(r.point_id[:16] for r in bad[:5])
    return (f"machine {machine}: {len(bad)} recovery point(s) failed verification ({pts}); "
            f"damaged objects: {', '.join(objs[:10])}{' …' if len(objs) > 10 else ''}; "
            "a failover to these points would not restore the machine: run 'siterecovery "
            "check --read-data' on the vault and keep the source protected")


def _metrics(core: Core, rows: Sequence[PointVerification]) -> None:
    m = core.metrics
    by: dict[str, list[PointVerification]] = {}
    for r in rows:
        by.setdefault(r.machine or "vault", []).append(r)
    for machine, rs in by.items():
        m.verify_last.labels(machine).set(max(r.verified for r in rs))
        m.verify_failed.labels(machine).set(sum(1 for r in rs if not r.ok))


async def status(core: Core, machine: str | None = None) -> dict[str, Any]:
    """The stored results (of ``machine``), newest verification first."""
    async with core.sessionmaker() as s:
        q = select(PointVerification).order_by(PointVerification.verified.desc())
        if machine is not None:
            q = q.where(PointVerification.machine == machine)
        rows = (await s.execute(q)).scalars().all()
        last = (await s.execute(select(db.Job).where(db.Job.kind == VERIFY.name)
                                .order_by(db.Job.created.desc()).limit(1))).scalar_one_or_none()
    return {"points": [{"point": r.point_id, "machine": r.machine, "verified": r.verified,
                        "ok": r.ok, "damaged": list(r.damaged)} for r in rows],
            "verified": sum(1 for r in rows if r.ok), "failed": sum(1 for r in rows if not r.ok),
            "last_job": None if last is None else {"id": last.id, "state": last.state,
                                                   "created": last.created,
                                                   "ended": last.ended, "error": last.error}}


def budget(memory_mib: int, data_dir: str) -> dict[str, Any]:
    """The job parameters of the server's memory budget (``gc_memory_mib``) and where the
    index goes past it (``<data_dir>/verify-index``)."""
    return {"memory_mib": memory_mib, "index_dir": str(Path(data_dir) / "verify-index")}


async def request(core: Core, params: dict[str, Any]) -> db.Job:
    """Queue a verification with ``params`` (see the module's docstring); the job."""
    return await vaultjobs.request(core, VERIFY, params, "verify_requested")


async def schedule_once(core: Core, interval_hours: float, params: dict[str, Any]
                        ) -> db.Job | None:
    """A scheduled verification, when one is due (``vaultjobs.schedule_once``)."""
    return await vaultjobs.schedule_once(core, VERIFY, interval_hours, params,
                                         "verify_requested")


async def schedule(core: Core, interval_hours: float, params: dict[str, Any],
                   check_seconds: float = 60.0) -> None:
    """The in-daemon schedule of verifications (0 hours: off)."""
    await vaultjobs.schedule(core, VERIFY, interval_hours, params, "verify_requested",
                             check_seconds)


VERIFY = JobKind("verify_points", "Verify recovery points",
                 (Step("verify", "Verify the recovery points", _verify),))
KINDS = (VERIFY,)
