"""The uploader: turns cached cycles into recovery points in the vault.

Each machine's cycles are processed in arrival order (a delta builds on the point
before it); different machines do not wait for each other. Segments are processed
as soon as they are sealed, so upload overlaps receiving. After each segment the
cycle is checkpointed: its packs and an index for them are durable in the vault,
its block-map changes are appended (fsynced) to the cycle's journal, and only then
is the segment deleted and its cache space released — so a cycle larger than the
cache quota drains instead of stalling, and a restarted process server resumes
from the journal (invariant 9).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import delete, func, select

from procserver import db
from procserver.cache import fsync_or_die, read_segment, remove_cycle_dir
from procserver.wire import Frame, FrameType
from vault.errors import MissingObjectError
from vault.locks import locked
from vault.point import Point
from vault.writer import CycleWriter, DiskSpec, MissingBlocksError

if TYPE_CHECKING:
    from procserver.server import ProcServer

log = structlog.get_logger("procserver.uploader")
BATCH = 128
LOCK_WAIT = 600.0


class BaseGoneError(Exception):
    """The point a delta cycle builds on no longer exists."""
JOURNAL = "changes.log"
JREC = struct.Struct("<HQ32s")


class _Wakeups:
    """Edge-triggered wake-ups without lost signals: register, check, then wait."""

    def __init__(self) -> None:
        self._events: set[asyncio.Event] = set()

    def fire(self) -> None:
        for ev in self._events:
            ev.set()

    def register(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._events.add(ev)
        return ev

    def forget(self, ev: asyncio.Event) -> None:
        self._events.discard(ev)


class Uploader:
    def __init__(self, server: ProcServer) -> None:
        self.server = server
        self._wakeups = _Wakeups()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max(1, server.cfg.upload_threads))

    def wake(self) -> None:
        self._wakeups.fire()

    async def run(self) -> None:
        try:
            while True:
                ev = self._wakeups.register()
                try:
                    async with self.server.sessionmaker() as s:
                        machines = (await s.execute(
                            select(db.Cycle.machine).where(
                                db.Cycle.state.in_([db.RECEIVING, db.COMPLETE])).distinct()
                        )).scalars().all()
                        backlog = (await s.execute(select(func.count()).where(
                            db.Cycle.state == db.COMPLETE))).scalar_one()
                    self.server.metrics.backlog_cycles.set(backlog)
                    for m in machines:
                        t = self._workers.get(m)
                        if t is None or t.done():
                            self._workers[m] = asyncio.create_task(self._worker(m),
                                                                   name=f"upload-{m}")
                    await ev.wait()
                finally:
                    self._wakeups.forget(ev)
        finally:
            for t in self._workers.values():
                t.cancel()
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    async def _worker(self, machine: str) -> None:
        failures = 0
        while True:
            async with self.server.sessionmaker() as s:
                cyc = (await s.execute(
                    select(db.Cycle).where(db.Cycle.machine == machine,
                                           db.Cycle.state.in_([db.RECEIVING, db.COMPLETE]))
                    .order_by(db.Cycle.seq).limit(1))).scalar_one_or_none()
            if cyc is None:
                return
            try:
                async with locked(self.server.vault, "shared", f"upload {machine}",
                                  wait=LOCK_WAIT):
                    await self.process(cyc)
                failures = 0
            except asyncio.CancelledError:
                raise
            except (MissingBlocksError, BaseGoneError) as e:
                # The cycle cannot become a restorable point any more. Drop it: the
                # agent's next cycle builds on it, is refused, and resyncs in full.
                log.error("cycle_unrecoverable", machine=machine, cycle=cyc.id, error=str(e),
                          hint="the machine will resync")
                await self._drop(cyc)
            except Exception as e:
                failures += 1
                delay = min(60.0, 0.5 * 2 ** min(failures, 7)) * random.uniform(0.5, 1.0)
                log.error("cycle_upload_failed", machine=machine, cycle=cyc.id, error=str(e),
                          error_type=type(e).__name__, retry_in_seconds=round(delay, 2))
                await asyncio.sleep(delay)

    async def _drop(self, cyc: db.Cycle) -> None:
        async with self.server.sessionmaker() as s:
            row = await s.get_one(db.Cycle, cyc.seq)
            row.state = db.ABORTED
            await s.execute(delete(db.Segment).where(db.Segment.cycle_seq == cyc.seq))
            await s.commit()
        await asyncio.to_thread(remove_cycle_dir,
                                self.server.cache_dir / cyc.machine / cyc.id)
        self.server.release_cache(cyc.seq)

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
        try:
            return await self.server.vault.read_point(base.point_id)
        except MissingObjectError:
            raise BaseGoneError(f"cycle {cyc.id} builds on point {base.point_id[:16]}, which "
                                "a prune removed") from None

    async def process(self, cyc: db.Cycle) -> None:
        server = self.server
        server.index = await server.vault.refresh_index(server.index)
        begin = json.loads(cyc.begin_doc)
        disks = [DiskSpec(d["name"], d["size"], d["block_size"]) for d in begin["disks"]]
        cycle_dir = server.cache_dir / cyc.machine / cyc.id
        writer = CycleWriter(
            server.vault, server.index, server.executor, machine=cyc.machine, cycle=cyc.id,
            disks=disks, full=cyc.full, base=await self._base_point(cyc),
            on_upload=server.metrics.uploaded_bytes.inc,
        )
        writer.replay(await asyncio.to_thread(_read_journal, cycle_dir / JOURNAL))
        try:
            while True:
                ev = self._wakeups.register()
                try:
                    # State first, then segments: the session records every segment before
                    # it marks the cycle complete, so "complete and no segments left" read
                    # in this order means done. The other order races with the session.
                    state = await self._state(cyc.seq)
                    if state.state == db.ABORTED:
                        await writer.abort()
                        return
                    async with server.sessionmaker() as s:
                        segs = (await s.execute(select(db.Segment).where(
                            db.Segment.cycle_seq == cyc.seq).order_by(db.Segment.seq))
                        ).scalars().all()
                    if state.state == db.COMPLETE and not segs:
                        break
                    for seg in segs:
                        async with self._slots:
                            await self._process_segment(writer, cyc, seg, cycle_dir)
                    if not segs:
                        await ev.wait()
                finally:
                    self._wakeups.forget(ev)
            end = json.loads(state.end_doc or "{}")
            if writer.block_count() != end["blocks"]:
                # Never write a point that does not hold every block the agent sent.
                raise RuntimeError(f"cycle {cyc.id}: {writer.block_count()} blocks processed, "
                                   f"{end['blocks']} acknowledged")
            async with self._slots:
                point = await writer.finish(end["digests"], begin["consistency"],
                                            end.get("created"))
        except BaseException:
            await writer.abort()
            raise
        async with server.sessionmaker() as s:
            row = await s.get_one(db.Cycle, cyc.seq)
            row.state, row.point_id = db.UPLOADED, point.id
            if await s.get(db.PointReport, point.id) is None:
                s.add(db.PointReport(point_id=point.id, machine=point.machine,
                                     doc=json.dumps(point.to_json()), reported=False))
            await s.commit()
        await asyncio.to_thread(remove_cycle_dir, cycle_dir)
        server.release_cache(cyc.seq)
        server.metrics.points.inc()
        server.reporter.wake()
        self.wake()
        async with server.points_changed:
            server.points_changed.notify_all()
        log.info("point_uploaded", machine=cyc.machine, cycle=cyc.id, point=point.id,
                 consistency=point.consistency, stored_bytes=writer.stored_bytes)

    async def _process_segment(self, writer: CycleWriter, cyc: db.Cycle, seg: db.Segment,
                               cycle_dir: Path) -> None:
        frames = await asyncio.to_thread(_read_all, seg.path)
        for i in range(0, len(frames), BATCH):
            items = []
            for f in frames[i:i + BATCH]:
                d, n, data = f.block()
                items.append((d, n, data if f.type == FrameType.BLOCK else None))
            await writer.add(items)
        del frames
        # Checkpoint: durable in the vault and journaled before the segment goes.
        journal = await writer.checkpoint()
        await asyncio.to_thread(_append_journal, cycle_dir / JOURNAL, journal)
        async with self.server.sessionmaker() as s:
            await s.execute(delete(db.Segment).where(db.Segment.id == seg.id))
            await s.commit()
        await asyncio.to_thread(Path(seg.path).unlink, True)
        self.server.release_cache(cyc.seq, seg.size)


def _read_all(path: str) -> list[Frame]:
    return list(read_segment(path))


def _append_journal(path: Path, entries: list[tuple[int, int, bytes]]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"".join(JREC.pack(d, n, bid) for d, n, bid in entries))
        fsync_or_die(fd, str(path))
    finally:
        os.close(fd)
    if new:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            fsync_or_die(dfd, str(path.parent))
        finally:
            os.close(dfd)


def _read_journal(path: Path) -> list[tuple[int, int, bytes]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    whole = len(data) - len(data) % JREC.size
    if whole != len(data):
        # A torn append was never fsynced, so its segment was never deleted and will
        # be processed again: drop the tail so later appends stay aligned.
        os.truncate(path, whole)
    return [JREC.unpack_from(data, o) for o in range(0, whole, JREC.size)]
