"""Gauges the process server computes when ``/metrics`` is scraped.

The cache free ratio, the upload backlog age, each machine's RPO (the age of its newest
point, on the policies' ``clock``) and the RPO threshold of its policy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from procserver import db
from procserver.backlog import upload_backlog
from procserver.cachespace import CacheSpace
from procserver.metrics import ProcMetrics
from procserver.policies import Policies

log = structlog.get_logger("procserver.policies")


def _created(p: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(p)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


async def newest_points(sessionmaker: async_sessionmaker[AsyncSession]) -> dict[str, datetime]:
    """Each machine's newest point written here: the time it was taken."""
    async with sessionmaker() as s:
        newest = select(func.max(db.Cycle.seq)).where(
            db.Cycle.state == db.UPLOADED).group_by(db.Cycle.machine)
        rows = (await s.execute(
            select(db.Cycle.machine, db.PointReport.doc)
            .join(db.PointReport, db.PointReport.point_id == db.Cycle.point_id)
            .where(db.Cycle.seq.in_(newest)))).all()
    out = {}
    for machine, doc in rows:
        t = _created(str(json.loads(doc).get("created", "")))
        if t is not None:
            out[machine] = t
    return out


class ScrapeGauges:
    """Sets the gauges of ``metrics`` that are computed when ``/metrics`` is scraped."""

    def __init__(self, metrics: ProcMetrics, policies: Policies,
                 sessionmaker: async_sessionmaker[AsyncSession], cache_dir: Path,
                 space: CacheSpace) -> None:
        self.metrics, self.policies = metrics, policies
        self.sessionmaker, self.cache_dir, self.space = sessionmaker, cache_dir, space

    async def refresh(self) -> None:
        """Set the gauges (on failure they keep their values and the scrape answers)."""
        policies, m = self.policies, self.metrics
        quota = self.space.quota
        try:
            disk_free = (await asyncio.to_thread(shutil.disk_usage, self.cache_dir)).free
            _bytes, backlog_age = await upload_backlog(self.sessionmaker, self.cache_dir)
            newest = await newest_points(self.sessionmaker)
        except Exception as e:  # the database on a full disk, say: the scrape still answers
            log.warning("metrics_refresh_failed", error=str(e) or type(e).__name__,
                        error_type=type(e).__name__)
            return
        free_ratio = min(1.0, max(0, min(quota - self.space.used, disk_free)) / quota)
        now = policies.clock()
        # Once policies are known: the machines assigned here; before, every machine.
        shown = sorted(set(newest) & set(policies.items) if policies.known else set(newest))
        m.cache_free_ratio.set(free_ratio)
        m.upload_backlog_seconds.set(backlog_age)
        m.item_rpo.clear()
        for machine in shown:
            m.item_rpo.labels(machine).set(max(0.0, (now - newest[machine]).total_seconds()))
        m.item_rpo_threshold.clear()
        for machine, pol in sorted(policies.items.items()):
            m.item_rpo_threshold.labels(machine).set(pol.rpo_threshold_seconds)
