"""The uploader: turns cached cycles into recovery points in the vault.

Each machine's cycles are processed in arrival order (a delta builds on the point
before it) by a worker of its own; different machines do not wait for each other. One
attempt at one cycle (procserver/cycleupload.py) checkpoints it segment by segment and
holds the vault's shared lock (procserver/vaultlock.py) only while it writes; a failed
attempt is retried with back-off from the cycle's journal.

A cycle being aborted is *withheld* (``withhold``): its upload stops, and the abort
goes on only once none of its segments is mapped or open here any more — a mapped
or open file keeps its space after it is deleted, and the next cycle needs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from pathlib import Path

import structlog
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.backoff import Backoff
from procserver import db
from procserver.cache import remove_cycle_dir
from procserver.cachespace import CacheSpace
from procserver.cycleupload import (
    BaseGoneError,
    CycleUpload,
    UploadContext,
    drop_lease,
)
from procserver.metrics import ProcMetrics
from procserver.segruns import Mappings
from procserver.storagehealth import StorageHealth
from procserver.vaultaccess import VaultAccess
from procserver.vaultlock import SharedVaultLock
from procserver.wakeups import Wakeups
from vault.writer import MissingBlocksError

log = structlog.get_logger("procserver.uploader")
# An aborted cycle's upload lets go of its segments within this time (it stops at the
# next run of frames; a checkpoint under way ends first).
LET_GO_WAIT = 60.0


class Uploader:
    """Turns the cached cycles in ``sessionmaker``'s database into points in the vault
    (once ``vaults`` is open), releasing their ``space`` as they drain; ``on_point`` is
    called after each point is recorded (the reporter's outbox has a new row),
    ``on_checkpoint`` after each checkpoint deleted its segments. Failed
    uploads and the writes that end them are told to ``storage`` (the heartbeat's)."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], vaults: VaultAccess,
                 cache_dir: Path, space: CacheSpace, executor: Executor,
                 metrics: ProcMetrics, threads: int,
                 on_point: Callable[[], None] = lambda: None,
                 storage: StorageHealth | None = None,
                 on_checkpoint: Callable[[], None] = lambda: None) -> None:
        self.sessionmaker, self.vaults, self.cache_dir = sessionmaker, vaults, cache_dir
        self.space, self.executor, self.metrics = space, executor, metrics
        self.on_point = on_point
        # Awaited with (machine, cycle id, reason) once an acknowledged cycle was dropped
        # as unrecoverable (one still being received is aborted by its session, which
        # runs ``CycleBook.on_abort``).
        self.on_drop: list[Callable[[str, str, str], Awaitable[None]]] = []
        # Called with (cycle seq, reason) when a cycle not yet acknowledged is dropped:
        # True if a session (or the cycle book) holds it open and aborts it, deleting its
        # cache once nothing writes into it (``CycleBook.drop``); False: not open here.
        self.drop_open: Callable[[int, str], bool] = lambda _seq, _reason: False
        self.storage = storage if storage is not None else StorageHealth()
        self.points_changed = asyncio.Condition()  # notified after each point uploaded
        self._wakeups = Wakeups()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self.mappings = Mappings()  # the runs of segments mapped now, by cycle
        self._withheld: set[int] = set()  # cycles being aborted: never uploaded
        self._busy: dict[int, asyncio.Event] = {}  # cycles being processed: set when not
        self.vault_lock = SharedVaultLock(vaults, metrics)
        self._ctx = UploadContext(
            sessionmaker=sessionmaker, vaults=vaults, cache_dir=cache_dir, space=space,
            executor=executor, metrics=metrics, storage=self.storage, lock=self.vault_lock,
            wakeups=self._wakeups, slots=asyncio.Semaphore(max(1, threads)),
            mappings=self.mappings, withheld=self._withheld, on_checkpoint=on_checkpoint)

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
            try:
                await self.process(cyc)
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
                acknowledged = await self._drop(cyc, str(e) or type(e).__name__)
                await drop_lease(self.vaults, cyc)
                if acknowledged:
                    for hook in self.on_drop:
                        await hook(cyc.machine, cyc.id, f"unrecoverable: {e}")
            except Exception as e:
                delay = backoff.next()
                self.storage.failed(machine, e)  # past storage_alert_seconds: an alert
                log.error("cycle_upload_failed", machine=machine, cycle=cyc.id, error=str(e),
                          error_type=type(e).__name__, retry_in_seconds=round(delay, 2))
            if delay is not None:
                # Not inside ``except``: the error's traceback holds the failed upload's
                # frames, and with them views of its mapped segments.
                await asyncio.sleep(delay)

    async def process(self, cyc: db.Cycle) -> None:
        """One attempt at the cycle ``cyc``: to a point, or until it is aborted or
        withheld (procserver/cycleupload.py)."""
        busy = self._busy[cyc.seq] = asyncio.Event()
        try:
            point = await CycleUpload(self._ctx, cyc).run()
        finally:
            del self._busy[cyc.seq]
            busy.set()
        if point is None:
            return
        self.on_point()
        self.wake()
        async with self.points_changed:
            self.points_changed.notify_all()

    async def _drop(self, cyc: db.Cycle, reason: str) -> bool:
        """Mark ``cyc`` aborted and delete its cache; whether it had been acknowledged.

        A cycle still open (being received, or suspended) is handed to its session
        (``drop_open``), which refuses it at the agent's next frame and deletes the cache
        once its writer has stopped: deleting it here would pull the folder from under
        that writer. Its END, if it comes first, finds the row aborted (``receive.py``)."""
        async with self.sessionmaker() as s:
            row = await s.get_one(db.Cycle, cyc.seq, with_for_update=True)
            acknowledged = row.state == db.COMPLETE
            row.state = db.ABORTED
            handed = not acknowledged and self.drop_open(cyc.seq, reason)
            if not handed:
                await s.execute(delete(db.Segment).where(db.Segment.cycle_seq == cyc.seq))
            await s.commit()
        if handed:
            return False
        await asyncio.to_thread(remove_cycle_dir, self.cache_dir / cyc.machine / cyc.id)
        self.space.release(cyc.seq)
        return acknowledged


def _worker_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (e := task.exception()) is not None:
        # The machine's cycles stay in the cache: the next wake-up starts a new worker.
        log.error("upload_worker_failed", task=task.get_name(),
                  error=str(e) or type(e).__name__, error_type=type(e).__name__)
