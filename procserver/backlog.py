"""The upload backlog: what waits in the cache for the uploader, and since when."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sqlalchemy import exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from procserver import db

JOURNAL = "changes.log"  # procserver/uploader.py: the cycle's journal, written per checkpoint


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


async def upload_backlog(sessionmaker: async_sessionmaker[AsyncSession], cache_dir: Path
                         ) -> tuple[int, float]:
    """Bytes waiting for upload and how long the oldest of them has waited (seconds).

    Waiting are the sealed segments of cycles still receiving or complete; a complete
    cycle with every segment consumed waits for its ``finish`` since its last checkpoint.
    A segment's waiting starts when it was sealed (its file's last write).
    """
    live = (db.RECEIVING, db.COMPLETE)
    async with sessionmaker() as s:
        total = (await s.execute(
            select(func.coalesce(func.sum(db.Segment.size), 0))
            .join(db.Cycle, db.Cycle.seq == db.Segment.cycle_seq)
            .where(db.Cycle.state.in_(live)))).scalar_one()
        oldest = (await s.execute(
            select(db.Segment.path).join(db.Cycle, db.Cycle.seq == db.Segment.cycle_seq)
            .where(db.Cycle.state.in_(live)).order_by(db.Segment.id).limit(4))
        ).scalars().all()
        finishing = (await s.execute(select(db.Cycle).where(
            db.Cycle.state == db.COMPLETE,
            ~exists().where(db.Segment.cycle_seq == db.Cycle.seq)))).scalars().all()

    def since() -> list[float]:
        times = []
        for p in oldest:  # the oldest one may be consumed meanwhile: take the next
            if (t := _mtime(Path(p))) is not None:
                times.append(t)
                break
        for c in finishing:
            t = _mtime(cache_dir / c.machine / c.id / JOURNAL)
            times.append(t if t is not None else c.created)
        return times

    times = await asyncio.to_thread(since)
    age = max(0.0, time.time() - min(times)) if times else 0.0
    return int(total), age


async def pending_cycles(sessionmaker: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    """Per machine, the cycles acknowledged to its agent whose point is not whole in the
    vault yet (``complete``, not ``uploaded``): what a failover to the ``latest`` point
    waits for. Machines with none are left out."""
    async with sessionmaker() as s:
        rows = (await s.execute(select(db.Cycle.machine, func.count()).where(
            db.Cycle.state == db.COMPLETE).group_by(db.Cycle.machine))).all()
    return {str(m): int(n) for m, n in rows}
