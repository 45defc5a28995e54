"""Alerts: process-server health and RPO, the way operators know them from ASR.

An alert is a condition on a target (a process server's or a machine's name). While
it holds, exactly one *active* row for (code, target) exists in ``events``; when it
ends that row gets ``active = false`` and ``cleared_at``. A change of severity
clears the row and opens a new one, so the history shows when a warning became
critical. The message of an active row is kept current (the latest values).

Conditions (``now`` is ``core.clock()``, so tests age things with an injected clock):

===============================  ========  ============================================
code                             severity  when
===============================  ========  ============================================
procserver_cache_free_low        warning   cache free ratio < 0.30 at the last heartbeat
procserver_cache_free_low        critical  cache free ratio < 0.25
procserver_upload_backlog        warning   upload backlog > 30 min at the last heartbeat
procserver_upload_backlog        critical  upload backlog > 45 min
procserver_heartbeat_missing     critical  no heartbeat for 15 min or more
procserver_storage_failing       warning   uploads to the vault failing without a success
                                           for ``storage_alert_seconds`` (default 300)
procserver_storage_failing       critical  for 3 times that
rpo_threshold_exceeded           warning   a protected (or resyncing) item's latest point
                                           is older than its policy's RPO threshold
drill_overdue                    warning   a protected item's last successful drill (test
                                           failover) ended more than ``drill_warning_days``
                                           ago; never drilled: counted from when Finalize
                                           protection succeeded (or the item's creation)
tracker_missed_writes            critical  the machine's agent reported that a
                                           verification scan found changed blocks its
                                           change tracker had not named (cleared when a
                                           later verification finds none)
===============================  ========  ============================================

A process server that stopped heartbeating keeps its last reported cache and
backlog alerts (they are the last known state) next to the heartbeat alert. Silence
is counted from this configuration server's start at the earliest (``up_since``).

``evaluate()`` runs after every heartbeat, on demand (``POST /api/v1/alerts/evaluate``),
and in ``run()``: every ``alert_interval_seconds`` and soon after ``core.notify()``
(new points). Evaluations are serialized: per server by the ``AlertBook``'s lock, and
across configuration servers sharing one PostgreSQL catalog by an advisory transaction
lock. An evaluation that raised or cleared something calls ``core.notify()`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import func, select, text

from configserver import db
from configserver.core import Core, next_pass
from configserver.items import DAY, ItemState, last_good_drill
from configserver.notifyoutbox import CLEARED, RAISED, Change, enqueue
from configserver.replication import FINALIZE
from configserver.schema import iso
from configserver.thresholds import (
    BACKLOG_CRITICAL_S,
    BACKLOG_WARNING_S,
    CACHE_FREE_CRITICAL,
    CACHE_FREE_WARNING,
    HEARTBEAT_CRITICAL_S,
)

log = structlog.get_logger("configserver.alerts")

STORAGE_CRITICAL_FACTOR = 3  # storage failing this many times storage_alert_seconds

CACHE_LOW = "procserver_cache_free_low"
BACKLOG = "procserver_upload_backlog"
NO_HEARTBEAT = "procserver_heartbeat_missing"
STORAGE = "procserver_storage_failing"
CERT_REVOKED = "procserver_certificate_revoked"
RPO = "rpo_threshold_exceeded"
DRILL_OVERDUE = "drill_overdue"
TRACKER_MISSED = "tracker_missed_writes"
PROCSERVER_CODES = (CACHE_LOW, BACKLOG, NO_HEARTBEAT, STORAGE, CERT_REVOKED)
# the codes this module owns in ``events``
CODES = (*PROCSERVER_CODES, RPO, DRILL_OVERDUE, TRACKER_MISSED)
SEVERITIES = ("warning", "critical")
# Items whose agent is expected to keep sending points (an item still in initial
# replication has no RPO yet; one being disabled is going away).
RPO_STATES = (ItemState.PROTECTED, ItemState.RESYNCING, ItemState.RESYNC_REQUIRED)
# Items a drill is expected of: protected ones (a drill under way does not stop the count;
# a failed-over machine runs on the target and is drilled again after reprotect).
DRILL_WATCH = (*RPO_STATES, ItemState.TEST_FAILOVER_IN_PROGRESS, ItemState.TEST_FAILOVER_DONE)
_PG_LOCK_KEY = 0x5352_414C  # "SRAL": one advisory lock for alert evaluation
_MIN_GAP_S = 1.0  # notification-driven evaluations run at most this often


@dataclass(frozen=True)
class Alert:
    code: str
    target: str
    severity: str
    message: str


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def procserver_alerts(ps: db.ProcessServer, now: float, up_since: float,
                      storage_alert_seconds: float = 300.0) -> list[Alert]:
    """The alerts one process server's last heartbeat (and its age) call for.

    Silence counts from ``up_since`` (this configuration server's start) at the earliest:
    heartbeats sent while it was down could not arrive, so a restart after a long outage
    does not raise a heartbeat alert before the process servers had a chance to call.
    Failing uploads count from the start of the failure the heartbeats reported.
    """
    out = []
    free = ps.cache_free_ratio
    if free < CACHE_FREE_WARNING:
        critical = free < CACHE_FREE_CRITICAL
        limit = CACHE_FREE_CRITICAL if critical else CACHE_FREE_WARNING
        out.append(Alert(CACHE_LOW, ps.name, "critical" if critical else "warning",
                         f"process server {ps.name}: cache free {free:.0%} (below {limit:.0%}); "
                         "uploads are not keeping up or the cache is too small: check the "
                         "vault's reachability and cache_quota_bytes"))
    backlog = ps.backlog_seconds
    if backlog > BACKLOG_WARNING_S:
        critical = backlog > BACKLOG_CRITICAL_S
        limit = BACKLOG_CRITICAL_S if critical else BACKLOG_WARNING_S
        out.append(Alert(BACKLOG, ps.name, "critical" if critical else "warning",
                         f"process server {ps.name}: data has waited {_duration(backlog)} for "
                         f"upload (over {_duration(limit)}; {ps.backlog_bytes} bytes pending); "
                         "check the vault's reachability and the upload throughput"))
    age = now - ps.last_contact
    if now - max(ps.last_contact, up_since) >= HEARTBEAT_CRITICAL_S:
        out.append(Alert(NO_HEARTBEAT, ps.name, "critical",
                         f"process server {ps.name}: no heartbeat for {_duration(age)}; is it "
                         "running and can it reach the configuration server?"))
    if ps.storage_failing_since is not None \
            and (failing := now - ps.storage_failing_since) >= storage_alert_seconds:
        critical = failing >= STORAGE_CRITICAL_FACTOR * storage_alert_seconds
        out.append(Alert(STORAGE, ps.name, "critical" if critical else "warning",
                         f"process server {ps.name}: uploads to the vault have failed for "
                         f"{_duration(failing)} without a success (last error: "
                         f"{ps.storage_error or 'unknown'}); no recovery point is made while "
                         "the data waits in the cache: check the vault's storage (free "
                         "space, credentials, reachability)"))
    return out


def revoked_alert(ps: db.ProcessServer, newest: db.Certificate | None) -> Alert | None:
    """A process server whose newest certificate from this CA is revoked refuses every
    agent (procserver/trust.py) until it has a new one: critical."""
    if newest is None or newest.revoked_at is None:
        return None
    return Alert(CERT_REVOKED, ps.name, "critical",
                 f"process server {ps.name}: its certificate (serial {newest.serial}) is "
                 f"revoked since {iso(newest.revoked_at)}, and it refuses every agent until "
                 f"it has a new one: siterecovery cert procserver --name {ps.name} --host "
                 "ADDRESS --out DIR, then put those files in place of its tls_cert and "
                 "tls_key (read at the next handshake, no restart)")


def rpo_alert(item: db.ReplicatedItem, threshold: int | None, now: float) -> Alert | None:
    """The RPO alert an item calls for, if any."""
    if item.state not in RPO_STATES or item.latest_point_time is None or threshold is None:
        return None
    rpo = now - item.latest_point_time
    if rpo <= threshold:
        return None
    return Alert(RPO, item.machine, "warning",
                 f"machine {item.machine}: RPO {_duration(rpo)} exceeds the policy "
                 f"{item.policy!r} threshold of {_duration(threshold)}; check the agent and "
                 "its process server")


def drill_alert(item: db.ReplicatedItem, protected_at: float | None, warning_days: float,
                now: float) -> Alert | None:
    """The drill-freshness alert an item calls for, if any: its last successful drill ended
    more than ``warning_days`` ago, or it never had one since ``protected_at`` (when
    Finalize protection succeeded; the item's creation if no such job is known)."""
    if item.state not in DRILL_WATCH:
        return None
    good = last_good_drill(item.last_drill)
    since = good["ended"] if good is not None else (
        protected_at if protected_at is not None else item.created)
    age = now - since
    if age <= warning_days * DAY:
        return None
    days, m = age / DAY, item.machine
    what = (f"no successful drill for {days:.0f} days (the last ended {iso(good['ended'])}, "
            f"point {good['point']})" if good is not None else
            f"no successful drill since it was protected {days:.0f} days ago")
    return Alert(DRILL_OVERDUE, m, "warning",
                 f"machine {m}: {what}; drill_warning_days is {warning_days:g}: prove the "
                 f"recovery with 'siterecovery failover test {m} --wait', then 'siterecovery "
                 f"failover cleanup {m}'")


def tracker_alert(machine: str, report: dict[str, Any] | None) -> Alert | None:
    """The alert of an agent whose last verification scan of a disk found changed blocks
    its tracker had not named (``report``: the heartbeat's ``trackers``), if any."""
    bad = {d: r for d, r in sorted((report or {}).items())
           if isinstance(r, dict) and r.get("missed_blocks", 0) > 0}
    if not bad:
        return None
    disks = ", ".join(f"{d} ({r['missed_blocks']} blocks, {r['tracker']} tracker, verified "
                      f"{iso(r['verified_at']) if r.get('verified_at') else 'at an unknown time'})"
                      for d, r in bad.items())
    return Alert(TRACKER_MISSED, machine, "critical",
                 f"machine {machine}: a verification scan found changed blocks the change "
                 f"tracker had not named: {disks}. The points since that scan hold them; "
                 "points taken before it may lack them (restore and check them, or drill). "
                 "Set tracker = \"scan\" in the agent's mobility.toml until the cause is "
                 "known; the alert clears when a later verification finds nothing missed")


@dataclass
class AlertBook:
    """One configuration server's alert bookkeeping: since when it is up (silence counts
    from then), its thresholds from the configuration, the evaluation lock and the metric
    labels in use."""

    up_since: float
    drill_warning_days: float = 180.0
    storage_alert_seconds: float = 300.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    procservers: set[str] = field(default_factory=set)
    machines: set[str] = field(default_factory=set)
    drilled: set[str] = field(default_factory=set)


async def evaluate(core: Core, st: AlertBook) -> list[Alert]:
    """Bring ``events`` and the alert metrics in line with the catalog; return what is active."""
    async with st.lock:
        now = core.clock()
        raised: list[Alert] = []
        cleared: list[db.Event] = []
        async with core.sessionmaker() as s, s.begin():
            if core.dialect == "postgresql":
                await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            procservers = (await s.execute(select(db.ProcessServer))).scalars().all()
            items = (await s.execute(
                select(db.ReplicatedItem, db.Policy.rpo_threshold_s).outerjoin(
                    db.Policy, db.Policy.name == db.ReplicatedItem.policy))).all()
            protected_at = {str(t): float(e) for t, e in (await s.execute(
                select(db.Job.target, func.max(db.Job.ended)).where(
                    db.Job.kind == FINALIZE.name, db.Job.state == "succeeded")
                .group_by(db.Job.target))).all() if e is not None}
            reports = (await s.execute(select(db.Machine.name, db.Machine.tracker_report))
                       ).all()
            registered = await s.get(db.Registration, 1) is not None
            newest: dict[str, db.Certificate] = {}
            for c in (await s.execute(select(db.Certificate).where(
                    db.Certificate.kind == "procserver").order_by(
                    db.Certificate.issued_at))).scalars().all():
                newest[c.subject] = c  # the last issued for each name wins
            want: dict[tuple[str, str], Alert] = {}
            for ps in procservers:
                for a in procserver_alerts(ps, now, st.up_since, st.storage_alert_seconds):
                    want[(a.code, a.target)] = a
                if (a1 := revoked_alert(ps, newest.get(ps.name))) is not None:
                    want[(a1.code, a1.target)] = a1
            for item, threshold in items:
                if (a2 := rpo_alert(item, threshold, now)) is not None:
                    want[(a2.code, a2.target)] = a2
                if (a3 := drill_alert(item, protected_at.get(item.machine),
                                      st.drill_warning_days, now)) is not None:
                    want[(a3.code, a3.target)] = a3
            for machine, report in reports:
                if (a4 := tracker_alert(machine, report)) is not None:
                    want[(a4.code, a4.target)] = a4
            active = (await s.execute(select(db.Event).where(
                db.Event.active.is_(True), db.Event.code.in_(CODES)).order_by(db.Event.id))
            ).scalars().all()
            kept: set[tuple[str, str]] = set()
            for ev in active:
                key = (ev.code, ev.target)
                still = want.get(key)
                if still is None or still.severity != ev.severity or key in kept:
                    ev.active, ev.cleared_at = False, now
                    cleared.append(ev)
                    continue
                kept.add(key)
                ev.message = still.message
            for key, a in want.items():
                if key not in kept:
                    s.add(db.Event(time=now, severity=a.severity, code=a.code, target=a.target,
                                   message=a.message, active=True, cleared_at=None))
                    raised.append(a)
            # Notices commit with the events they announce (configserver/notifyoutbox.py).
            await enqueue(s, now, [Change(CLEARED, e.code, e.target, e.severity, e.message)
                                   for e in cleared]
                          + [Change(RAISED, a.code, a.target, a.severity, a.message)
                             for a in raised])
        for ev in cleared:
            log.info("alert_cleared", code=ev.code, target=ev.target, severity=ev.severity)
        for a in raised:
            (log.error if a.severity == "critical" else log.warning)(
                "alert_raised", code=a.code, target=a.target, severity=a.severity,
                message=a.message)
        _update_metrics(core, st, list(want.values()), procservers,
                        [(i, t) for i, t in items])
        core.metrics.unrecoverable.set(0 if registered else len(items))
        result = list(want.values())
    if raised or cleared:  # waiters on the notifier see alerts move (at most once more)
        await core.notify()
    return result


def _age(clock: Callable[[], float], since: float) -> Callable[[], float]:
    return lambda: max(0.0, clock() - since)


def _update_metrics(core: Core, st: AlertBook, alerts: Sequence[Alert],
                    procservers: Sequence[db.ProcessServer],
                    items: Sequence[tuple[db.ReplicatedItem, int | None]]) -> None:
    m = core.metrics
    for sev in SEVERITIES:
        for code in CODES:
            m.alerts_active.labels(sev, code).set(
                sum(1 for a in alerts if a.severity == sev and a.code == code))
    names = {ps.name for ps in procservers}
    for ps in procservers:
        m.ps_cache_free.labels(ps.name).set(ps.cache_free_ratio)
        m.ps_backlog_seconds.labels(ps.name).set(ps.backlog_seconds)
        m.ps_backlog_bytes.labels(ps.name).set(ps.backlog_bytes)
        m.ps_storage_failing.labels(ps.name).set(
            0.0 if ps.storage_failing_since is None
            else max(0.0, ps.last_contact - ps.storage_failing_since))
        # Computed at scrape time: the age keeps growing between evaluations.
        m.ps_heartbeat_age.labels(ps.name).set_function(_age(core.clock, ps.last_contact))
    for gone in st.procservers - names:
        for g in (m.ps_cache_free, m.ps_backlog_seconds, m.ps_backlog_bytes, m.ps_heartbeat_age,
                  m.ps_heartbeats, m.ps_storage_failing):
            with contextlib.suppress(KeyError):
                g.remove(gone)
    st.procservers = names
    machines = set()
    for item, _threshold in items:
        if item.latest_point_time is not None:
            machines.add(item.machine)
            m.item_rpo.labels(item.machine).set_function(
                _age(core.clock, item.latest_point_time))
    for gone in st.machines - machines:
        with contextlib.suppress(KeyError):
            m.item_rpo.remove(gone)
    st.machines = machines
    drilled = set()
    for item, _threshold in items:
        if (good := last_good_drill(item.last_drill)) is not None:
            drilled.add(item.machine)
            m.item_drill_time.labels(item.machine).set(good["ended"])
            rto = good["rto_seconds"]
            if isinstance(rto, (int, float)):
                m.item_drill_rto.labels(item.machine).set(rto)
            else:
                with contextlib.suppress(KeyError):
                    m.item_drill_rto.remove(item.machine)
    for gone in st.drilled - drilled:
        for g in (m.item_drill_time, m.item_drill_rto):
            with contextlib.suppress(KeyError):
                g.remove(gone)
    st.drilled = drilled


async def run(core: Core, st: AlertBook, interval: float) -> None:
    """The background evaluator: every ``interval`` seconds, and soon after a change."""
    async with core.notifier.watching("alerts-watch") as dirty:
        while True:
            dirty.clear()
            try:
                await evaluate(core, st)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a catalog hiccup must not end alerting
                log.error("alert_evaluation_failed", error=str(e), error_type=type(e).__name__,
                          retry_in_seconds=interval)
            await next_pass(dirty, min(_MIN_GAP_S, interval), interval)
