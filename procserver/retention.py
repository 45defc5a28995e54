"""Retention at the process server: the pulled policies (``policies.py``) applied.

After each pull (or once per interval on the saved policies) each policy's machine's
points older than its ``retention_hours`` are forgotten in the vault with the vault's
own plan (``vault/retention.py``: every point of the window kept, none thinned; the
newest point and the newest app-consistent point always kept), under the vault's
exclusive lock as prune takes it. Also kept: the point of each machine's newest uploaded
cycle and every point a cycle still in the cache builds on (the agent's next delta names
them), and points not yet reported to the catalog (a report after the forget would list
a point that is gone). As prune does, a kept point whose delta chain crosses a forgotten
one first gets full maps (rebase), then the forgotten manifests are deleted. Garbage
collection — maps, packs and index entries only forgotten points used — is left to
``siterecovery prune``.

**The catalog** is told through an outbox (``forgotten_points``): rows are written
before the manifests are deleted, sent to ``POST /api/v1/internal/points/forgotten``
and removed once accepted; ids whose manifest still exists (a round interrupted between
the two) are dropped unsent, the next round forgets those points again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from procserver import db
from procserver.csclient import ConfigServerClient, ConfigServerError
from procserver.models import ForgottenPoint
from procserver.vaultaccess import VaultAccess
from vault import names
from vault.chain import BrokenChainError, chain_of, crosses, rebase
from vault.locks import LockedError, locked
from vault.point import Point
from vault.retention import Retention, plan

log = structlog.get_logger("procserver.policies")

LOCK_WAIT = 30.0  # for the exclusive lock; a busy vault defers retention to the next round
LOG_IDS = 100  # point ids named per log event (the count is always whole)
REPORT_BATCH = 1000  # ids per catalog request (configserver/api_points.py MAX_FORGOTTEN)


class RetentionPolicy(Protocol):
    """What retention reads of a machine's policy (``policies.ItemPolicy``)."""

    @property
    def name(self) -> str: ...
    @property
    def retention_hours(self) -> int: ...


class PolicySource(Protocol):
    """Where retention finds the policies and the time (``policies.Policies``)."""

    @property
    def items(self) -> Mapping[str, RetentionPolicy]: ...
    @property
    def clock(self) -> Callable[[], datetime]: ...


@dataclass
class RetentionReport:
    forgotten: dict[str, list[str]] = field(default_factory=dict)  # machine -> point ids
    kept: dict[str, str] = field(default_factory=dict)  # point id -> why
    rebased: list[str] = field(default_factory=list)


class PointRetention:
    """Forgets the points past their machine's retention, and tells the catalog."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], vaults: VaultAccess,
                 policies: PolicySource, client: ConfigServerClient, interval: float,
                 spool_dir: Path | None = None) -> None:
        self.sessionmaker, self.vaults, self.client = sessionmaker, vaults, client
        self.spool_dir = spool_dir  # where a rebase spools the full maps it writes
        self.policies = policies  # its items and clock, read at each round
        self.interval = interval  # policy_interval_seconds: the next round
        self._work = asyncio.Lock()  # one retention round or outbox flush at a time

    async def round(self) -> None:
        """One retention round of the policy loop: failures are logged, not raised."""
        if not self.vaults.ready.is_set():
            log.info("retention_deferred", reason="the vault is not open yet",
                     retry_in_seconds=self.interval)
            return
        try:
            await self.apply()
        except LockedError as e:
            log.info("retention_deferred", reason=str(e),
                     retry_in_seconds=self.interval)
        except Exception as e:  # a failing store or database: the next round plans again
            log.error("retention_failed", error=str(e) or type(e).__name__,
                      error_type=type(e).__name__, hint="nothing is lost: an interrupted "
                      "round leaves every kept point whole; the next round plans again")

    async def _protected(self) -> dict[str, str]:
        """Points this process server still needs, with why."""
        out: dict[str, str] = {}
        async with self.sessionmaker() as s:
            newest = select(func.max(db.Cycle.seq)).where(
                db.Cycle.state == db.UPLOADED).group_by(db.Cycle.machine)
            for pid in (await s.execute(select(db.Cycle.point_id).where(
                    db.Cycle.seq.in_(newest)))).scalars():
                if pid is not None:
                    out[pid] = "newest uploaded cycle (the agent's next delta builds on it)"
            cached = select(db.Cycle.base).where(
                db.Cycle.state.in_([db.RECEIVING, db.COMPLETE]), db.Cycle.base.is_not(None))
            for pid in (await s.execute(select(db.Cycle.point_id).where(
                    db.Cycle.id.in_(cached)))).scalars():
                if pid is not None:
                    out[pid] = "a cycle in the cache builds on it"
            for pid in (await s.execute(select(db.PointReport.point_id).where(
                    db.PointReport.reported.is_(False)))).scalars():
                out[pid] = "not yet reported to the catalog"
        return out

    async def apply(self) -> RetentionReport:
        """Forget, for each machine with a policy, the points past its retention.

        Raises ``LockedError`` when the vault stays locked for ``LOCK_WAIT`` seconds."""
        report = RetentionReport()
        policies = dict(self.policies.items)
        if not policies:
            return report
        vault = self.vaults.vault
        async with self._work, locked(vault, "exclusive", "retention", wait=LOCK_WAIT):
            now = self.policies.clock()
            protected = await self._protected()  # under the lock: no point appears now
            points = await vault.list_points()
            by_id = {p.id: p for p in points}
            forget: dict[str, list[Point]] = {}
            for machine, pol in policies.items():
                pts = [p for p in points if p.machine == machine]
                if not pts:
                    continue
                r = float(pol.retention_hours)
                try:
                    keep = plan(pts, Retention(r, r, r, r), now)
                except ValueError as e:
                    log.error("retention_failed", machine=machine, error=str(e))
                    continue
                for p in pts:
                    if p.id in protected:
                        keep.setdefault(p.id, protected[p.id])
                report.kept.update({p.id: keep[p.id] for p in pts if p.id in keep})
                gone = [p for p in pts if p.id not in keep]
                if gone:
                    forget[machine] = gone
            if not forget:
                return report
            ids = {p.id for pts in forget.values() for p in pts}
            async with self.sessionmaker() as s:  # the outbox first
                for pts in forget.values():
                    for p in pts:
                        await s.merge(ForgottenPoint(point_id=p.id, machine=p.machine))
                await s.commit()
            for pid in [k for k in report.kept if by_id[k].machine in forget]:
                try:
                    chain = await chain_of(vault, by_id[pid], by_id)
                except BrokenChainError as e:  # cannot be restored, so cannot be rebased
                    log.warning("retention_chain_broken", point=pid, error=str(e))
                    continue
                if crosses(chain, ids):
                    by_id[pid] = await rebase(vault, by_id[pid], by_id,
                                              spool_dir=self.spool_dir)
                    report.rebased.append(pid)
            for machine, pts in forget.items():
                for p in pts:
                    await vault.store.delete(names.POINTS + p.id)
                report.forgotten[machine] = [p.id for p in pts]
                pol = policies[machine]
                log.info("points_forgotten", machine=machine, count=len(pts),
                         points=[p.id for p in pts[:LOG_IDS]], oldest=pts[0].created,
                         newest=pts[-1].created, policy=pol.name,
                         retention_hours=pol.retention_hours,
                         rebased=[k for k in report.rebased if by_id[k].machine == machine])
        return report

    # -- the catalog's outbox ----------------------------------------------------------
    async def flush_forgotten(self) -> None:
        """Tell the catalog which points were forgotten (the outbox, in batches)."""
        async with self._work:
            while True:
                async with self.sessionmaker() as s:
                    rows = (await s.execute(select(ForgottenPoint).order_by(
                        ForgottenPoint.point_id).limit(REPORT_BATCH))).scalars().all()
                if not rows:
                    return
                gone = [r.point_id for r in rows
                        if not await self.vaults.vault.has_point(r.point_id)]
                try:
                    if gone:
                        answer = await self.client.post("/api/v1/internal/points/forgotten",
                                                        {"points": gone})
                        if answer.status != 200:
                            raise ConfigServerError(f"HTTP {answer.status}: "
                                                    f"{answer.excerpt()}")
                except ConfigServerError as e:
                    log.warning("forgotten_report_failed", error=str(e) or type(e).__name__,
                                pending=len(rows))
                    return
                async with self.sessionmaker() as s:
                    await s.execute(delete(ForgottenPoint).where(
                        ForgottenPoint.point_id.in_([r.point_id for r in rows])))
                    await s.commit()
                log.info("forgotten_points_reported", count=len(gone),
                         still_in_vault=len(rows) - len(gone))
