"""Cycles being received: in memory (``OpenCycle``), durably (``ReceiveProgress``), and
what becomes of them at the process server (``CycleBook``).

A cycle is open from BEGIN until its END is acknowledged (the uploader takes it from
there) or it is aborted. A resumable one whose session ended without END is
*suspended*: what arrived is recorded and kept for ``resume_window_seconds``; it is
aborted when that window passes or when its machine begins a newer cycle
(superseded: at that BEGIN, or as soon as the session that still held it lets it go —
never kept for the window, which would keep the newer cycle's point waiting behind it).
An open cycle the uploader finds can never become a point (``drop``: what it builds on
left the vault) is refused by its session at the agent's next frame and aborted.
At start, ``recover`` keeps each machine's newest resumable cycle, drops every other
unacknowledged one, and accounts the cache space of what stays.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from procserver import db
from procserver.cache import SealedSegment, cache_usage, drop_unsealed, remove_cycle_dir
from procserver.cachespace import CacheSpace
from procserver.models import ReceiveProgress
from wire.protocol import ProtocolError

log = structlog.get_logger("procserver")


OPEN, COMPLETE, ABORTED = "open", "complete", "aborted"


@asynccontextmanager
async def _nothing_to_withhold(_cycle_seq: int) -> AsyncIterator[None]:
    yield


@dataclass(eq=False)
class OpenCycle:
    """A cycle being received, in memory; for a resumable one, also while suspended."""

    seq: int
    id: str
    machine: str
    doc: dict[str, Any]
    resumable: bool
    cycle_dir: Path
    frames: int = 0  # frames handed to the cache (durable once synced)
    last: tuple[int, int] | None = None  # highest (disk, block) among them
    floor: tuple[int, int] | None = None  # after a resume, frames must come after this
    next_segment: int = 0
    state: str = OPEN
    owner: asyncio.Task[Any] | None = None
    detaching: bool = False  # its session ended and is sealing what arrived
    suspended_at: float | None = None  # time.monotonic() when it was last suspended
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    expiry: asyncio.TimerHandle | None = None
    superseded: bool = False  # a newer cycle of its machine began while a session held it
    # Why the uploader dropped it while it was open (it can never become a point): its
    # session refuses it at the next frame, ``cycle_dropped``, and aborts it.
    dropped: str | None = None
    # Set by the session receiving it: makes its wait for the agent's next frame raise.
    interrupt: Callable[[BaseException | None], None] | None = None
    limits: list[tuple[int, int, int]] = field(init=False)
    # One bit per block and disk: a block may arrive once per cycle (bounded memory:
    # 1 bit per 64 KiB is 4 MiB for a 2 TiB disk).
    seen: list[bytearray] = field(init=False)

    def __post_init__(self) -> None:
        self.limits = [((d["size"] + d["block_size"] - 1) // d["block_size"],
                        d["block_size"], d["size"]) for d in self.doc["disks"]]
        self.seen = [bytearray((n + 7) // 8) for n, _bs, _size in self.limits]

    def position(self) -> list[int] | None:
        return None if self.last is None else [self.last[0], self.last[1]]

    def cut_session(self) -> bool:
        """Cancel the session still receiving this cycle, if one is (not one already
        sealing what arrived): its agent gave the connection up. Whether one was."""
        owner = self.owner
        if owner is None or owner.done() or self.detaching:
            return False
        owner.cancel()
        return True


def dropped_error(oc: OpenCycle) -> ProtocolError:
    """What the agent is told about a cycle the uploader dropped while it was sent."""
    return ProtocolError("cycle_dropped", f"cycle {oc.id} was dropped while it was "
                         f"received: {oc.dropped}; the agent's next cycle is refused and "
                         "resyncs")


class CycleBook:
    """The open cycles of one process server: durable progress, suspend, resume window,
    supersede, abort; and, at start, which of them survive."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], cache_dir: Path,
                 space: CacheSpace, resume_window: float, *,
                 wake_uploader: Callable[[], None],
                 spawn: Callable[[Coroutine[Any, Any, None]], Any],
                 withhold_upload: Callable[[int], AbstractAsyncContextManager[None]]
                 = _nothing_to_withhold) -> None:
        self.sessionmaker, self.cache_dir, self.space = sessionmaker, cache_dir, space
        self.resume_window = resume_window  # resume_window_seconds
        self.wake_uploader = wake_uploader  # segments were recorded, or a cycle went
        # ``Uploader.withhold``: a cycle being aborted is let go of by the uploader
        # (none of its segments mapped or open there) before its files are deleted.
        self.withhold_upload = withhold_upload
        # runs an abort when a resume window ends, or when a superseded cycle is let go
        # (shutdown waits)
        self.spawn = spawn
        # Cycles being received (and resumable ones while suspended), by cycle id.
        self.open: dict[str, OpenCycle] = {}
        self.changed = asyncio.Condition()  # notified when a cycle is suspended or aborted
        # Awaited with (machine, cycle id, reason) once a cycle is aborted (a consistency
        # group's point that holds it fails: ``Barriers.cycle_dropped``).
        self.on_abort: list[Callable[[str, str, str], Awaitable[None]]] = []

    async def recover(self) -> None:
        """Drop cycles that were never acknowledged; account for the ones still cached.

        Cycles still receiving when we died were never acked: their data goes, unless
        the cycle is resumable (its agent speaks ``resume``) and is its machine's newest:
        then its recorded segments stay, the unrecorded tail is deleted, and the agent
        may resume it within ``resume_window_seconds``. Cache folders of no complete or
        resumable cycle (left by a crash between a database commit and the folder's
        removal) are removed too.
        """
        async with self.sessionmaker() as s:
            rows = (await s.execute(select(db.Cycle).where(db.Cycle.state == db.RECEIVING)
                                    .order_by(db.Cycle.seq))).scalars().all()
            progress = {p.cycle_seq: p for p in
                        (await s.execute(select(ReceiveProgress))).scalars().all()}
            newest = {m: seq for m, seq in (await s.execute(
                select(db.Cycle.machine, func.max(db.Cycle.seq)).group_by(db.Cycle.machine)
            )).all()}
            dropped, kept = [], []
            for row in rows:
                p = progress.get(row.seq)
                cycle_dir = self.cache_dir / row.machine / row.id
                if p is not None and newest.get(row.machine) == row.seq and \
                        (p.frames == 0 or cycle_dir.is_dir()):
                    kept.append((row, p))
                else:
                    row.state = db.ABORTED
                    dropped.append(row)
            await s.execute(delete(ReceiveProgress).where(
                ReceiveProgress.cycle_seq.in_([r.seq for r in dropped])))
            await s.commit()
            live = (await s.execute(select(db.Cycle).where(db.Cycle.state == db.COMPLETE))
                    ).scalars().all()
        if dropped:
            log.warning("unacknowledged_cycles_dropped", count=len(dropped))
        keep = {self.cache_dir / c.machine / c.id: c.seq for c in live}
        for row, p in kept:
            last = None if p.last_disk is None or p.last_block is None \
                else (p.last_disk, p.last_block)
            oc = OpenCycle(row.seq, row.id, row.machine, json.loads(row.begin_doc), True,
                           self.cache_dir / row.machine / row.id, frames=p.frames, last=last,
                           floor=last, next_segment=p.next_segment)
            await asyncio.to_thread(drop_unsealed, oc.cycle_dir, p.next_segment)
            keep[oc.cycle_dir] = oc.seq
            self.open[oc.id] = oc
            oc.suspended_at = time.monotonic()
            self._start_resume_window(oc)
            log.info("cycle_resumable", machine=row.machine, cycle=row.id, blocks=p.frames,
                     position=oc.position())
        left: list[Path] = []
        for machine_dir in await asyncio.to_thread(_subdirs, self.cache_dir):
            for cycle_dir in await asyncio.to_thread(_subdirs, machine_dir):
                if cycle_dir in keep:
                    size = await asyncio.to_thread(cache_usage, cycle_dir)
                    self.space.hold(keep[cycle_dir], size)
                else:
                    left.append(cycle_dir)
        await self._uploaded_unlogged(left)
        for cycle_dir in left:
            await asyncio.to_thread(remove_cycle_dir, cycle_dir)

    async def _uploaded_unlogged(self, left: list[Path]) -> None:
        """The uploader logs ``point_uploaded`` before it removes the cycle's folder: the
        folder of an uploaded cycle found at start means the process was killed between
        the record and the line, so the line is logged now (``recovered``: a kill between
        the line and the removal logs it twice; watchers key on the point)."""
        if not left:
            return
        found = {(d.parent.name, d.name) for d in left}  # (machine, cycle id)
        async with self.sessionmaker() as s:
            rows = (await s.execute(select(db.Cycle).where(
                db.Cycle.state == db.UPLOADED,
                db.Cycle.id.in_([cid for _m, cid in found])))).scalars().all()
        for row in rows:
            if (row.machine, row.id) in found:
                log.info("point_uploaded", machine=row.machine, cycle=row.id,
                         point=row.point_id, recovered=True)

    async def record_segments(self, oc: OpenCycle, segs: list[SealedSegment]) -> None:
        """Segments of ``oc`` are fsynced: their rows and the cycle's progress, atomically."""
        async with self.sessionmaker() as s:
            for seg in segs:
                s.add(db.Segment(cycle_seq=oc.seq, seq=seg.number, path=str(seg.path),
                                 size=seg.size))
            if oc.resumable:
                p = await s.get(ReceiveProgress, oc.seq)
                if p is not None:
                    last = segs[-1]
                    p.frames, p.next_segment = last.frames, last.number + 1
                    p.last_disk, p.last_block = last.last if last.last else (None, None)
            await s.commit()
        self.wake_uploader()

    def suspended(self) -> int:
        return sum(1 for oc in self.open.values()
                   if oc.suspended_at is not None and oc.state == OPEN)

    async def suspend(self, oc: OpenCycle, reason: str) -> None:
        """A resumable cycle's session ended without END; what arrived is recorded."""
        async with self.sessionmaker() as s:
            newest = (await s.execute(select(func.max(db.Cycle.seq)).where(
                db.Cycle.machine == oc.machine))).scalar_one()
        if newest is not None and newest > oc.seq:  # its agent has moved on already
            await self.abort(oc, "superseded")
            return
        oc.suspended_at = time.monotonic()
        self._start_resume_window(oc)
        async with self.changed:
            self.changed.notify_all()
        log.info("cycle_suspended", machine=oc.machine, cycle=oc.id, blocks=oc.frames,
                 position=oc.position(), reason=reason,
                 resume_window_seconds=self.resume_window)

    def _start_resume_window(self, oc: OpenCycle) -> None:
        if oc.expiry is not None:
            oc.expiry.cancel()
        oc.expiry = asyncio.get_running_loop().call_later(
            self.resume_window, self._expire, oc)

    def _expire(self, oc: OpenCycle) -> None:
        oc.expiry = None
        if oc.state == OPEN and oc.owner is None and not oc.lock.locked():
            self.spawn(self.abort(oc, "resume window passed"))

    def stop_timers(self) -> None:
        """At shutdown: no resume window ends any more (the next start sets them anew)."""
        for oc in self.open.values():
            if oc.expiry is not None:
                oc.expiry.cancel()
                oc.expiry = None

    async def supersede(self, machine: str, new_seq: int) -> None:
        """``machine`` began cycle ``new_seq``: none of its older cycles will be resumed
        (an agent resumes only the cycle it is sending). A suspended one is aborted now;
        one a session still holds (it may be letting go of it this moment, past its own
        check for a newer cycle) is aborted once that session lets go, unless it ended
        complete. A session still receiving one is on a connection its agent gave up on
        (half-open: the agent cannot tell us, and began anew on another): it is cut, as a
        RESUME cuts it, rather than left to hold the newer cycle's point back until its
        idle timeout; it suspends, and its suspend finds this newer cycle."""
        for oc in list(self.open.values()):
            if oc.machine != machine or oc.seq >= new_seq or oc.state != OPEN:
                continue
            if oc.owner is None and not oc.lock.locked():
                await self.abort(oc, "superseded")
            elif not oc.superseded:
                oc.superseded = True
                if oc.cut_session():
                    log.info("cycle_session_cut", machine=machine, cycle=oc.id,
                             reason="a newer cycle of its machine began")
                self.spawn(self._abort_when_let_go(oc))

    async def _abort_when_let_go(self, oc: OpenCycle, reason: str = "superseded") -> None:
        async with oc.lock:  # held by the session that has it (begin, resume)
            if oc.state == OPEN and oc.owner is None:
                await self.abort(oc, reason)

    def drop(self, seq: int, reason: str) -> bool:
        """The uploader found that the open cycle ``seq`` can never become a point (what
        it builds on left the vault; its row is marked aborted already). The session
        receiving it refuses it at the agent's next frame (``cycle_dropped``) and aborts
        it once nothing writes into its cache any more; a suspended one is aborted now.
        False if no such cycle is open here: the caller deletes its cache itself."""
        oc = next((o for o in self.open.values() if o.seq == seq and o.state == OPEN), None)
        if oc is None:
            return False
        oc.dropped = reason
        # Its session may be waiting for a quiet agent, or for cache space that only
        # this cycle's abort would free (a cycle larger than the quota): wake it.
        error = dropped_error(oc)
        if oc.interrupt is not None:
            oc.interrupt(error)
        self.space.refuse(oc.seq, error)
        self.spawn(self._abort_when_let_go(oc, f"dropped: {reason}"))
        return True

    async def abort(self, oc: OpenCycle, reason: str = "") -> None:
        """Drop a cycle that was never acknowledged: row aborted, cache deleted.

        When it returns, the cycle's cache space is free on the disk (the uploader has
        let go of its segments first) and no database transaction of it is left open:
        a session may tell its agent the cycle was refused, and the next one fits."""
        if oc.state != OPEN:
            return
        oc.state = ABORTED
        self.open.pop(oc.id, None)
        if oc.expiry is not None:
            oc.expiry.cancel()
            oc.expiry = None
        async with self.withhold_upload(oc.seq):
            try:
                done = await self._mark_aborted(oc.seq)
            except Exception:
                # The database may sit on the cache's full disk: free the cycle's space
                # and try once more. (A cycle left `receiving` without its folder is
                # dropped at the next start; until then the uploader leaves it alone.)
                await asyncio.to_thread(remove_cycle_dir, oc.cycle_dir)
                self.space.release(oc.seq)
                done = await self._mark_aborted(oc.seq)
            if done is not None:
                # Its END was made durable (its session was cancelled right after, before
                # it could say so): the cycle will become a point; it is never aborted.
                oc.state = COMPLETE
                log.warning("cycle_abort_refused", machine=oc.machine, cycle=oc.id,
                            state=done, reason=reason or "its session ended")
            else:
                await asyncio.to_thread(remove_cycle_dir, oc.cycle_dir)
        if done is not None:
            self.wake_uploader()
            return
        self.space.release(oc.seq)
        self.wake_uploader()
        async with self.changed:
            self.changed.notify_all()
        log.warning("cycle_aborted", machine=oc.machine, cycle=oc.id, cycle_seq=oc.seq,
                    **({"reason": reason} if reason else {}))
        for hook in self.on_abort:
            await hook(oc.machine, oc.id, reason or "its session ended")

    async def _mark_aborted(self, seq: int) -> str | None:
        """Mark the cycle aborted and forget its segments; None, or the state that
        forbids it (``complete``, ``uploaded``: it was acknowledged, or is being)."""
        async with self.sessionmaker() as s:
            row = await s.get_one(db.Cycle, seq, with_for_update=True)
            if row.state in (db.COMPLETE, db.UPLOADED):
                return row.state
            row.state = db.ABORTED
            await s.execute(delete(ReceiveProgress).where(ReceiveProgress.cycle_seq == seq))
            await s.execute(delete(db.Segment).where(db.Segment.cycle_seq == seq))
            await s.commit()
        return None


def _subdirs(p: Path) -> list[Path]:
    return [c for c in p.iterdir() if c.is_dir()] if p.is_dir() else []
