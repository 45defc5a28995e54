"""The uploader: turns cached cycles into recovery points in the vault.

Each machine's cycles are processed in arrival order (a delta builds on the point
before it); different machines do not wait for each other. Segments are processed
as soon as they are sealed, so upload overlaps receiving. After each segment (or
run of small segments, ``CHECKPOINT_BYTES``) the cycle is checkpointed: its packs
and an index for them are durable in the vault, its block-map changes are appended
(fsynced) to the cycle's journal, and only then is the segment deleted and its cache
space released — so a cycle larger than the cache quota drains instead of stalling,
and a restarted process server resumes from the journal (invariant 9). A checkpoint
writes to the vault while the next segment is read, hashed and compressed;
checkpoints, and so journal appends, still complete in segment order.

A cycle being aborted is *withheld* (``withhold``): its upload stops, and the abort
goes on only once none of its segments is mapped or open here any more — a mapped
or open file keeps its space after it is deleted, and the next cycle needs it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TypeVar

import structlog
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.backoff import Backoff
from procserver import db
from procserver.backlog import JOURNAL
from procserver.cache import remove_cycle_dir
from procserver.cachespace import CacheSpace
from procserver.journal import append_journal, read_journal
from procserver.metrics import ProcMetrics
from procserver.segruns import Mappings, Run, SealedSegment, close_released
from procserver.storagehealth import StorageHealth
from procserver.vaultaccess import VaultAccess
from vault.errors import MissingObjectError
from vault.locks import locked
from vault.point import Point
from vault.writer import CycleWriter, DiskSpec, JournalEntry, MissingBlocksError

log = structlog.get_logger("procserver.uploader")
# Frames are handed to the writer (hashed on a worker thread) in runs of this many
# bytes or frames, each run a mapping of its own (procserver/segruns.py).
BATCH_BYTES = 8 << 20
BATCH_FRAMES = 1024
# At most this many bytes of sealed segments go into one checkpoint (at least one
# segment): small segments (closed at SYNC or END) share one, a full one has its own.
# A segment is deleted, and its page cache freed for the segments and packs being
# written, only after its checkpoint: larger runs hold more of the cache, and on a VM
# fresh memory costs more than memory the kernel just freed. A segment that is alone
# is checkpointed at once, so a cache that holds only a few segments always drains.
CHECKPOINT_BYTES = 64 << 20
LOCK_WAIT = 600.0
# An aborted cycle's upload lets go of its segments within this time (it stops at the
# next run of frames; a checkpoint under way ends first).
LET_GO_WAIT = 60.0
T = TypeVar("T")


class BaseGoneError(Exception):
    """The point a delta cycle builds on no longer exists."""


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
    """Turns the cached cycles in ``sessionmaker``'s database into points in the vault
    (once ``vaults`` is open), releasing their ``space`` as they drain; ``on_point`` is
    called after each point is recorded (the reporter's outbox has a new row). Failed
    uploads and the writes that end them are told to ``storage`` (the heartbeat's)."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], vaults: VaultAccess,
                 cache_dir: Path, space: CacheSpace, executor: Executor,
                 metrics: ProcMetrics, threads: int,
                 on_point: Callable[[], None] = lambda: None,
                 storage: StorageHealth | None = None) -> None:
        self.sessionmaker, self.vaults, self.cache_dir = sessionmaker, vaults, cache_dir
        self.space, self.executor, self.metrics = space, executor, metrics
        self.on_point = on_point
        self.storage = storage if storage is not None else StorageHealth()
        self.points_changed = asyncio.Condition()  # notified after each point uploaded
        self._wakeups = _Wakeups()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max(1, threads))
        self.mappings = Mappings()  # the runs of segments mapped now, by cycle
        self._withheld: set[int] = set()  # cycles being aborted: never uploaded
        self._busy: dict[int, asyncio.Event] = {}  # cycles being processed: set when not

    def wake(self) -> None:
        """Look for new cycles and segments now."""
        self._wakeups.fire()

    @asynccontextmanager
    async def withhold(self, cycle_seq: int) -> AsyncIterator[None]:
        """Stop uploading the cycle ``cycle_seq`` (it is being aborted) and enter once
        none of its segment files is mapped or open here any more, so that deleting
        them frees their space. Inside, the caller marks the cycle aborted; if that
        raises, the cycle stays withheld (its row may still say receiving). A
        mapping still left after ``LET_GO_WAIT`` is logged (``cycle_space_held``)."""
        self._withheld.add(cycle_seq)
        self.wake()
        try:
            async with asyncio.timeout(LET_GO_WAIT):
                busy = self._busy.get(cycle_seq)
                if busy is not None:
                    await busy.wait()
                await self.mappings.wait_unmapped(cycle_seq)
        except TimeoutError:
            log.warning("cycle_space_held", cycle_seq=cycle_seq,
                        mapped_runs=self.mappings.mapped(cycle_seq),
                        hint="the aborted cycle's cache space is freed when they go")
        yield
        self._withheld.discard(cycle_seq)

    async def wait_point(self, cycle: str, timeout: float = 300.0) -> str:
        """Wait until the acknowledged ``cycle`` is a whole point in the vault; return its
        id (``RuntimeError`` if the cycle was aborted, ``TimeoutError`` after ``timeout``)."""
        async with asyncio.timeout(timeout), self.points_changed:
            while True:
                async with self.sessionmaker() as s:
                    row = (await s.execute(select(db.Cycle).where(db.Cycle.id == cycle))
                           ).scalar_one_or_none()
                if row is not None and row.point_id is not None:
                    return row.point_id
                if row is not None and row.state == db.ABORTED:
                    raise RuntimeError(f"cycle {cycle} was aborted")
                await self.points_changed.wait()

    async def run(self) -> None:
        try:
            while True:
                ev = self._wakeups.register()
                try:
                    async with self.sessionmaker() as s:
                        machines = (await s.execute(
                            select(db.Cycle.machine).where(
                                db.Cycle.state.in_([db.RECEIVING, db.COMPLETE])).distinct()
                        )).scalars().all()
                        backlog = (await s.execute(select(func.count()).where(
                            db.Cycle.state == db.COMPLETE))).scalar_one()
                    self.metrics.backlog_cycles.set(backlog)
                    for m in machines:
                        t = self._workers.get(m)
                        if t is None or t.done():
                            t = self._workers[m] = asyncio.create_task(self._worker(m),
                                                                       name=f"upload-{m}")
                            t.add_done_callback(_worker_done)
                    await ev.wait()
                finally:
                    self._wakeups.forget(ev)
        finally:
            for t in self._workers.values():
                t.cancel()
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    async def _worker(self, machine: str) -> None:
        backoff = Backoff(base=1.0, cap=60.0)
        # A process server that started while its storage was down keeps cycles in the
        # cache until the vault is open (``VaultAccess.open_later``).
        await self.vaults.ready.wait()
        while True:
            async with self.sessionmaker() as s:
                cyc = (await s.execute(
                    select(db.Cycle).where(db.Cycle.machine == machine,
                                           db.Cycle.state.in_([db.RECEIVING, db.COMPLETE]),
                                           db.Cycle.seq.not_in(self._withheld))
                    .order_by(db.Cycle.seq).limit(1))).scalar_one_or_none()
            if cyc is None:
                self.storage.forget(machine)
                return
            delay = None
            # Registered before the cycle is looked at: a segment sealed after that look
            # wakes an idle worker (no lost wake-up while it waits unlocked).
            ev = self._wakeups.register()
            try:
                async with self._vault_lock(machine):
                    went_idle = not await self.process(cyc)
                if went_idle:
                    # Nothing of the cycle is in the vault yet and no segment is sealed:
                    # wait without the lock, so a prune can run meanwhile (issue #17).
                    await self._until_segment(cyc.seq, ev)
                    continue
                backoff.reset()
                self.storage.succeeded(machine)
            except asyncio.CancelledError:
                raise
            except (MissingBlocksError, BaseGoneError) as e:
                # The cycle cannot become a restorable point any more. Drop it: the
                # agent's next cycle builds on it, is refused, and resyncs in full.
                log.error("cycle_unrecoverable", machine=machine, cycle=cyc.id, error=str(e),
                          hint="the machine will resync")
                self.storage.forget(machine)
                await self._drop(cyc)
            except Exception as e:
                delay = backoff.next()
                self.storage.failed(machine, e)  # past storage_alert_seconds: an alert
                log.error("cycle_upload_failed", machine=machine, cycle=cyc.id, error=str(e),
                          error_type=type(e).__name__, retry_in_seconds=round(delay, 2))
            finally:
                self._wakeups.forget(ev)
            if delay is not None:
                # Not inside ``except``: the error's traceback holds the failed upload's
                # frames, and with them views of its mapped segments.
                await asyncio.sleep(delay)

    @asynccontextmanager
    async def _vault_lock(self, machine: str) -> AsyncIterator[None]:
        """The vault's shared lock for one attempt at a cycle; the time spent waiting for
        it goes to the metrics (``vault_lock_wait_seconds``, ``vault_lock_waiting``)."""
        async with AsyncExitStack() as stack:
            started = time.monotonic()
            self.metrics.vault_lock_waiting.inc()
            try:
                await stack.enter_async_context(locked(
                    self.vaults.vault, "shared", f"upload {machine}", wait=LOCK_WAIT))
            finally:
                self.metrics.vault_lock_waiting.dec()
                self.metrics.vault_lock_wait_seconds.inc(time.monotonic() - started)
            yield

    async def _until_segment(self, seq: int, ev: asyncio.Event) -> None:
        """Wait (woken by ``ev`` first) until the cycle ``seq`` has a sealed segment, is no
        longer receiving, or is withheld: other machines' wake-ups do not retake the lock."""
        while True:
            await ev.wait()
            ev.clear()  # still registered: a wake-up between the query and the wait stays
            if seq in self._withheld:
                return
            async with self.sessionmaker() as s:
                row = await s.get(db.Cycle, seq)
                seg = (await s.execute(select(db.Segment.id).where(
                    db.Segment.cycle_seq == seq).limit(1))).first()
            if row is None or row.state != db.RECEIVING or seg is not None:
                return

    async def _drop(self, cyc: db.Cycle) -> None:
        async with self.sessionmaker() as s:
            row = await s.get_one(db.Cycle, cyc.seq)
            row.state = db.ABORTED
            await s.execute(delete(db.Segment).where(db.Segment.cycle_seq == cyc.seq))
            await s.commit()
        await asyncio.to_thread(remove_cycle_dir, self.cache_dir / cyc.machine / cyc.id)
        self.space.release(cyc.seq)

    async def _state(self, seq: int) -> db.Cycle:
        async with self.sessionmaker() as s:
            return await s.get_one(db.Cycle, seq)

    async def _base_point(self, cyc: db.Cycle) -> Point | None:
        if cyc.full:
            return None
        async with self.sessionmaker() as s:
            base = (await s.execute(select(db.Cycle).where(db.Cycle.id == cyc.base))
                    ).scalar_one()
        if base.point_id is None:
            raise RuntimeError(f"base cycle {base.id} of cycle {cyc.id} has no point yet")
        try:
            return await self.vaults.vault.read_point(base.point_id)
        except MissingObjectError:
            raise BaseGoneError(f"cycle {cyc.id} builds on point {base.point_id[:16]}, which "
                                "a prune removed") from None

    async def process(self, cyc: db.Cycle) -> bool:
        """Upload the cycle ``cyc`` as far as its segments go (to a point once it is
        complete); return early if it is aborted or withheld meanwhile. False: it went
        *idle* — still receiving, no segment sealed yet and nothing of it written to the
        vault (no checkpoint journaled) — so the caller may wait for its segments without
        the vault lock. Once something is written, the lock is held until the point is:
        a prune meanwhile would delete the cycle's packs, which no point references yet."""
        busy = self._busy[cyc.seq] = asyncio.Event()
        try:
            return await self._process(cyc)
        finally:
            del self._busy[cyc.seq]
            busy.set()

    def _check_withheld(self, cyc: db.Cycle) -> None:
        if cyc.seq in self._withheld:
            raise _CycleAborted

    async def _process(self, cyc: db.Cycle) -> bool:
        if cyc.seq in self._withheld:
            return True
        vault, index = self.vaults.vault, await self.vaults.refresh_index()
        begin = json.loads(cyc.begin_doc)
        disks = [DiskSpec(d["name"], d["size"], d["block_size"]) for d in begin["disks"]]
        cycle_dir = self.cache_dir / cyc.machine / cyc.id
        writer = CycleWriter(
            vault, index, self.executor, machine=cyc.machine, cycle=cyc.id,
            disks=disks, full=cyc.full, base=await self._base_point(cyc),
            on_pack=self.metrics.pack_uploaded,
            before_pack=self.vaults.pack_recorder(cyc.seq),  # its packs are ours: orphans.py
        )
        journaled = await asyncio.to_thread(read_journal, cycle_dir / JOURNAL)
        writer.replay(journaled)
        # Nothing of this cycle in the vault yet (no checkpoint before, no segment now).
        untouched = not journaled
        # Segments handed to the writer whose checkpoint has not deleted them yet.
        taken: set[int] = set()
        # Mapped runs of segments some of whose blocks may wait to be sealed into a pack.
        mapped: list[Run] = []
        # The checkpoint of the previous run of segments: it writes to the vault while
        # the next run is read, hashed and compressed.
        commit: asyncio.Task[None] | None = None
        try:
            while True:
                ev = self._wakeups.register()
                try:
                    # State first, then segments: the session records every segment before
                    # it marks the cycle complete, so "complete and no segments left" read
                    # in this order means done. The other order races with the session.
                    state = await self._state(cyc.seq)
                    if state.state == db.ABORTED:
                        raise _CycleAborted
                    self._check_withheld(cyc)
                    # Taken before the query: a checkpoint that deletes rows (and forgets
                    # them in ``taken``) meanwhile must not make a stale row look new.
                    skip = set(taken)
                    async with self.sessionmaker() as s:
                        segs = [seg for seg in (await s.execute(select(db.Segment).where(
                            db.Segment.cycle_seq == cyc.seq).order_by(db.Segment.seq))
                        ).scalars().all() if seg.id not in skip]
                    if not segs:
                        if commit is not None:
                            # Nothing new yet: let the last checkpoint end (its segments
                            # are still listed until then), then look again.
                            await commit
                            commit = None
                            continue
                        if state.state == db.COMPLETE:
                            break
                        if untouched:
                            # Its writer and index are dropped: a prune may replace the
                            # index and delete blocks meanwhile, so the next attempt
                            # starts afresh from the vault as it is then.
                            return False
                        await ev.wait()
                        continue
                    run: list[db.Segment] = []
                    size = 0
                    for seg in segs:
                        if run and size + seg.size > CHECKPOINT_BYTES:
                            break
                        run.append(seg)
                        size += seg.size
                    untouched = False
                    for seg in run:
                        async with self._slots:
                            await self._add_segment(writer, cyc, seg.path, mapped)
                        taken.add(seg.id)
                    ck = await writer.start_checkpoint()
                    if commit is not None:
                        await commit  # journal appends stay in segment order
                    commit = asyncio.create_task(
                        self._commit(cyc, cycle_dir, ck, run, mapped, taken),
                        name=f"checkpoint-{cyc.machine}")
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
        except _CycleAborted:
            # The pack writes first: a checkpoint waiting for them ends without
            # journaling, one journaling already ends first (never cut in a transaction).
            await writer.abort()
            await _stop(commit, cancel=False)
            mapped.clear()
            return True
        except BaseException as e:
            # Cancel the pack writes first: a checkpoint still waiting for them fails
            # without journaling; one already journaling ends first. Cancelled (shutdown):
            # stop it too.
            await writer.abort()
            await _stop(commit, cancel=isinstance(e, asyncio.CancelledError))
            raise
        async with self.sessionmaker() as s:
            row = await s.get_one(db.Cycle, cyc.seq)
            row.state, row.point_id = db.UPLOADED, point.id
            if await s.get(db.PointReport, point.id) is None:
                s.add(db.PointReport(point_id=point.id, machine=point.machine,
                                     doc=json.dumps(point.to_json()), reported=False))
            await s.commit()
        await self.vaults.settle_cycle(cyc.seq)  # packs of failed attempts go
        await asyncio.to_thread(remove_cycle_dir, cycle_dir)
        self.space.release(cyc.seq)
        self.metrics.points.inc()
        self.on_point()
        self.wake()
        async with self.points_changed:
            self.points_changed.notify_all()
        log.info("point_uploaded", machine=cyc.machine, cycle=cyc.id, point=point.id,
                 consistency=point.consistency, stored_bytes=writer.stored_bytes,
                 logical_bytes=writer.logical_bytes)
        return True

    async def _add_segment(self, writer: CycleWriter, cyc: db.Cycle, path: str,
                           mapped: list[Run]) -> None:
        segment = await asyncio.to_thread(SealedSegment, path, BATCH_BYTES, BATCH_FRAMES)
        try:
            for run in segment.map_runs():
                self.mappings.track(cyc.seq, run)
                mapped.append(run)
                await writer.add(run.take())
                close_released(mapped)
                self._check_withheld(cyc)
        finally:
            segment.close()

    async def _commit(self, cyc: db.Cycle, cycle_dir: Path,
                      checkpoint: asyncio.Task[list[JournalEntry]], segs: list[db.Segment],
                      mapped: list[Run], taken: set[int]) -> None:
        """Journal a run of segments once its checkpoint is durable, then delete them."""
        journal = await checkpoint
        close_released(mapped)
        # Durable in the vault and journaled before the segments go. The append is never
        # left running behind a cancelled caller (a retry reads the journal).
        await _in_thread_to_the_end(append_journal, cycle_dir / JOURNAL, journal)
        self.storage.succeeded(cyc.machine)  # the vault took a checkpoint: it is writable
        ids = [seg.id for seg in segs]
        async with self.sessionmaker() as s:
            await s.execute(delete(db.Segment).where(db.Segment.id.in_(ids)))
            await s.commit()
        taken.difference_update(ids)
        await asyncio.to_thread(_unlink_all, [seg.path for seg in segs])
        self.space.release(cyc.seq, sum(seg.size for seg in segs))


def _worker_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (e := task.exception()) is not None:
        # The machine's cycles stay in the cache: the next wake-up starts a new worker.
        log.error("upload_worker_failed", task=task.get_name(),
                  error=str(e) or type(e).__name__, error_type=type(e).__name__)


class _CycleAborted(Exception):
    """The session aborted the cycle while it was being uploaded."""


async def _stop(task: asyncio.Task[None] | None, *, cancel: bool) -> None:
    if task is None:
        return
    if cancel:
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _in_thread_to_the_end(fn: Callable[..., T], *args: object) -> T:
    """``asyncio.to_thread``, except that a cancelled caller still waits for the thread."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)
