"""The uploader: turns cached cycles into recovery points in the vault, in arrival order.

Segments are processed as soon as they are sealed, so upload overlaps receiving.
A cycle's segments are deleted only after its point is whole in the vault and
recorded; a restarted process server re-processes every complete cycle still in
its cache (invariant 9).
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import select

from procserver import db
from procserver.cache import read_segment, remove_cycle_dir
from procserver.wire import Frame, FrameType
from vault.point import Point
from vault.writer import CycleWriter, DiskSpec

if TYPE_CHECKING:
    from procserver.server import ProcServer

log = structlog.get_logger("procserver.uploader")
BATCH = 128


class Uploader:
    def __init__(self, server: ProcServer) -> None:
        self.server = server
        self._changed = asyncio.Event()
        self.idle = asyncio.Event()

    def wake(self) -> None:
        self._changed.set()

    async def _next_cycle(self) -> db.Cycle | None:
        async with self.server.sessionmaker() as s:
            return (await s.execute(
                select(db.Cycle).where(db.Cycle.state.in_([db.RECEIVING, db.COMPLETE]))
                .order_by(db.Cycle.seq).limit(1))).scalar_one_or_none()

    async def run(self) -> None:
        failures = 0
        while True:
            self._changed.clear()
            cyc = await self._next_cycle()
            if cyc is None:
                self.idle.set()
                await self._changed.wait()
                continue
            self.idle.clear()
            try:
                await self.process(cyc)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                delay = min(60.0, 0.5 * 2 ** min(failures, 7)) * random.uniform(0.5, 1.0)
                log.error("cycle_upload_failed", cycle=cyc.id, error=str(e),
                          retry_in_seconds=round(delay, 2))
                await asyncio.sleep(delay)

    async def _state(self, seq: int) -> db.Cycle:
        async with self.server.sessionmaker() as s:
            return await s.get_one(db.Cycle, seq)

    async def _base_point(self, cyc: db.Cycle) -> Point | None:
        if cyc.full:
            return None
        async with self.server.sessionmaker() as s:
            base = (await s.execute(select(db.Cycle).where(db.Cycle.id == cyc.base))
                    ).scalar_one()
        if base.point_id is None:
            raise RuntimeError(f"base cycle {base.id} of cycle {cyc.id} has no point yet")
        return await self.server.vault.read_point(base.point_id)

    async def process(self, cyc: db.Cycle) -> None:
        server = self.server
        begin = json.loads(cyc.begin_doc)
        disks = [DiskSpec(d["name"], d["size"], d["block_size"]) for d in begin["disks"]]
        writer = CycleWriter(
            server.vault, server.index, server.executor, machine=cyc.machine, cycle=cyc.id,
            disks=disks, full=cyc.full, base=await self._base_point(cyc),
            on_upload=server.metrics.uploaded_bytes.inc,
        )
        done = 0
        try:
            while True:
                self._changed.clear()
                async with server.sessionmaker() as s:
                    segs = (await s.execute(select(db.Segment).where(
                        db.Segment.cycle_seq == cyc.seq, db.Segment.seq >= done)
                        .order_by(db.Segment.seq))).scalars().all()
                for seg in segs:
                    frames = await asyncio.to_thread(_read_all, seg.path)
                    for i in range(0, len(frames), BATCH):
                        items = []
                        for f in frames[i:i + BATCH]:
                            d, n, data = f.block()
                            items.append((d, n, data if f.type == FrameType.BLOCK else None))
                        await writer.add(items)
                    done += 1
                state = await self._state(cyc.seq)
                if state.state == db.ABORTED:
                    await writer.abort()
                    return
                if state.state == db.COMPLETE and not segs:
                    break
                if not segs:
                    await self._changed.wait()
            end = json.loads(state.end_doc or "{}")
            point = await writer.finish(end["digests"], begin["consistency"], end.get("created"))
        except BaseException:
            await writer.abort()
            raise
        async with server.sessionmaker() as s:
            row = await s.get_one(db.Cycle, cyc.seq)
            row.state, row.point_id = db.UPLOADED, point.id
            s.add(db.PointReport(point_id=point.id, machine=point.machine,
                                 doc=json.dumps(point.to_json()), reported=False))
            await s.commit()
        cycle_dir = server.cache_dir / cyc.machine / cyc.id
        freed = await asyncio.to_thread(_size, cycle_dir)
        await asyncio.to_thread(remove_cycle_dir, cycle_dir)
        server.release_cache(freed)
        server.metrics.points.inc()
        server.reporter.wake()
        async with server.points_changed:
            server.points_changed.notify_all()
        log.info("point_uploaded", machine=cyc.machine, cycle=cyc.id, point=point.id,
                 consistency=point.consistency, stored_bytes=writer.stored_bytes)


def _read_all(path: str) -> list[Frame]:
    return list(read_segment(path))


def _size(p: Path) -> int:
    from procserver.cache import cache_usage

    return cache_usage(p) if p.exists() else 0
