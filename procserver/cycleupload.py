"""One attempt at uploading one cycle: segments in, checkpoints out, then the point.

Segments are processed as soon as they are sealed, so upload overlaps receiving. After
each segment (or run of small segments, ``CHECKPOINT_BYTES``) the cycle is checkpointed:
its packs and an index for them are durable in the vault, a lease part naming the blocks
its changes reference is written (vault/locks.py), its block-map changes are appended
(fsynced) to the cycle's journal, and only then is the segment deleted and its cache
space released — so a cycle larger than the cache quota drains instead of stalling, and
a restarted process server resumes from the journal (invariant 9). A checkpoint writes
to the vault while the next segment is read, hashed and compressed; checkpoints, and so
journal appends, still complete in segment order.

The vault's shared lock (procserver/vaultlock.py) is held only while the attempt writes:
it is let go, once the last checkpoint is durable, whenever the cycle waits for a
segment still being received, so a prune can run between two segments, and after a
checkpoint when the lock yields to a waiting prune (writer preference), so a prune also
gets in while segments keep coming. What the cycle wrote until then is no point's yet;
its lease keeps it (the blocks, and the base point) from that prune. When the lock is
taken again after the vault's index was rewritten (a prune or rebuild-index ran), the
writer gets the new index and base point, and every block the cycle references is
checked to be still indexed (``MissingBlocksError`` otherwise: never a point that cannot
be restored).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from procserver import db
from procserver.backlog import JOURNAL
from procserver.cache import remove_cycle_dir
from procserver.cachespace import CacheSpace
from procserver.journal import append_journal, replay_journal
from procserver.metrics import ProcMetrics
from procserver.segruns import Mappings, Run, SealedSegment, close_released
from procserver.storagehealth import StorageHealth
from procserver.vaultaccess import VaultAccess
from procserver.vaultlock import SharedVaultLock
from procserver.wakeups import Wakeups
from vault.errors import MissingObjectError
from vault.locks import delete_lease, put_lease_part
from vault.maps import ZERO_ID
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
T = TypeVar("T")


class BaseGoneError(Exception):
    """The point a delta cycle builds on no longer exists."""


class CycleAborted(Exception):
    """The session aborted the cycle while it was being uploaded, or it is withheld."""


@dataclass
class UploadContext:
    """What an attempt uses, shared by every attempt of one uploader."""

    sessionmaker: async_sessionmaker[AsyncSession]
    vaults: VaultAccess
    cache_dir: Path
    space: CacheSpace
    executor: Executor
    metrics: ProcMetrics
    storage: StorageHealth
    lock: SharedVaultLock
    wakeups: Wakeups
    slots: asyncio.Semaphore
    mappings: Mappings
    withheld: set[int]
    on_checkpoint: Callable[[], None]  # a heap trim: a long cycle gives memory back


async def drop_lease(vaults: VaultAccess, cyc: db.Cycle) -> None:
    """Delete the lease of ``cyc`` (its point is written, or it never will be); a store
    error leaves it to expire (``cycle_lease_left``)."""
    try:
        await delete_lease(vaults.vault, cyc.machine, cyc.id)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.warning("cycle_lease_left", machine=cyc.machine, cycle=cyc.id, error=str(e),
                    error_type=type(e).__name__,
                    hint="it expires within a day; a prune then deletes it")


class CycleUpload:
    """One attempt at the cycle ``cyc``: ``run`` uploads it to a point, or returns once it
    is aborted or withheld (``CycleAborted`` caught: nothing partial stays in use)."""

    def __init__(self, ctx: UploadContext, cyc: db.Cycle) -> None:
        self.ctx, self.cyc = ctx, cyc
        self.cycle_dir = ctx.cache_dir / cyc.machine / cyc.id
        self.writer: CycleWriter | None = None
        self._held: AsyncExitStack | None = None  # while the vault lock is held

    def _check_withheld(self) -> None:
        if self.cyc.seq in self.ctx.withheld:
            raise CycleAborted

    async def _state(self) -> db.Cycle:
        async with self.ctx.sessionmaker() as s:
            return await s.get_one(db.Cycle, self.cyc.seq)

    async def _base_point(self) -> Point | None:
        cyc = self.cyc
        if cyc.full:
            return None
        async with self.ctx.sessionmaker() as s:
            base = (await s.execute(select(db.Cycle).where(db.Cycle.id == cyc.base))
                    ).scalar_one()
        if base.point_id is None:
            raise RuntimeError(f"base cycle {base.id} of cycle {cyc.id} has no point yet")
        try:
            return await self.ctx.vaults.vault.read_point(base.point_id)
        except MissingObjectError:
            raise BaseGoneError(f"cycle {cyc.id} builds on point {base.point_id[:16]}, which "
                                "a prune removed") from None

    # -- the lock --------------------------------------------------------------------------
    async def _take(self) -> CycleWriter:
        """Hold the vault lock (if not yet) and return the writer, up to date with the
        vault: made on the first take, given the new index and base after a prune."""
        if self._held is None:
            stack = AsyncExitStack()
            await stack.enter_async_context(self.ctx.lock.hold(f"upload {self.cyc.machine}"))
            self._held = stack
            try:
                await self._refresh()
            except BaseException:
                await self._let_go()
                raise
        assert self.writer is not None
        return self.writer

    async def _let_go(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await held.aclose()

    async def _refresh(self) -> None:
        ctx, cyc = self.ctx, self.cyc
        index = await ctx.vaults.refresh_index()
        writer = self.writer
        if writer is None:
            begin = json.loads(cyc.begin_doc)
            disks = [DiskSpec(d["name"], d["size"], d["block_size"]) for d in begin["disks"]]
            base = await self._base_point()
            self.writer = CycleWriter(
                ctx.vaults.vault, index, ctx.executor,
                machine=cyc.machine, cycle=cyc.id, disks=disks, full=cyc.full, base=base,
                on_pack=ctx.metrics.pack_uploaded,
                before_pack=ctx.vaults.pack_recorder(cyc.seq),  # ours: orphans.py
                spill_dir=ctx.cache_dir,  # a long cycle's changes past 10 MiB a disk, its maps
            )
            writer = self.writer

            async def apply(batch: list[JournalEntry]) -> None:
                # Resumed (a restart, a failed attempt): its lease may have expired
                # meanwhile: a part for each batch covers it.
                writer.replay(batch)
                await self._lease(batch)

            await replay_journal(self.cycle_dir / JOURNAL, apply)
            return
        if index is writer.index:
            return
        # The index was rewritten while the lock was let go: a prune (or rebuild-index)
        # ran. Its lease kept this cycle's blocks and base; make sure of it.
        writer.index = index
        if writer.base is not None:
            try:
                writer.base = await ctx.vaults.vault.read_point(writer.base.id)
            except MissingObjectError:
                raise BaseGoneError(f"cycle {cyc.id} builds on point {writer.base.id[:16]}, "
                                    "which a prune removed") from None
        missing = writer.unindexed()
        if missing:
            raise MissingBlocksError(f"cycle {cyc.id}: {missing} block(s) written earlier in "
                                     "the cycle are in no index any more")
        log.info("cycle_upload_resumed_after_prune", machine=cyc.machine, cycle=cyc.id,
                 blocks=writer.block_count())

    async def _lease(self, entries: list[JournalEntry]) -> None:
        writer = self.writer
        assert writer is not None
        blocks = {bid for _d, _n, bid in entries if bid != ZERO_ID}
        await put_lease_part(self.ctx.vaults.vault, self.cyc.machine, self.cyc.id,
                             writer.base.id if writer.base is not None else None,
                             sorted(blocks))

    # -- the attempt -----------------------------------------------------------------------
    async def run(self) -> Point | None:
        """The cycle's point, once written and recorded; None if the cycle was aborted
        or withheld meanwhile."""
        try:
            return await self._run()
        finally:
            await self._let_go()

    async def _run(self) -> Point | None:
        ctx, cyc = self.ctx, self.cyc
        # Segments handed to the writer whose checkpoint has not deleted them yet.
        taken: set[int] = set()
        # Mapped runs of segments some of whose blocks may wait to be sealed into a pack.
        mapped: list[Run] = []
        # The checkpoint of the previous run of segments: it writes to the vault while
        # the next run is read, hashed and compressed.
        commit: asyncio.Task[None] | None = None
        try:
            while True:
                ev = ctx.wakeups.register()
                try:
                    # State first, then segments: the session records every segment before
                    # it marks the cycle complete, so "complete and no segments left" read
                    # in this order means done. The other order races with the session.
                    state = await self._state()
                    if state.state == db.ABORTED:
                        raise CycleAborted
                    self._check_withheld()
                    # Taken before the query: a checkpoint that deletes rows (and forgets
                    # them in ``taken``) meanwhile must not make a stale row look new.
                    skip = set(taken)
                    async with ctx.sessionmaker() as s:
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
                        # Everything written is checkpointed and leased: wait for the
                        # agent without the lock, so a prune can run meanwhile (#17).
                        await self._let_go()
                        await ev.wait()
                        continue
                    writer = await self._take()
                    run: list[db.Segment] = []
                    size = 0
                    for seg in segs:
                        if run and size + seg.size > CHECKPOINT_BYTES:
                            break
                        run.append(seg)
                        size += seg.size
                    for seg in run:
                        async with ctx.slots:
                            await self._add_segment(writer, seg.path, mapped)
                        taken.add(seg.id)
                    ck = await writer.start_checkpoint()
                    if commit is not None:
                        await commit  # journal appends stay in segment order
                    commit = asyncio.create_task(self._commit(ck, run, mapped, taken),
                                                 name=f"checkpoint-{cyc.machine}")
                    if ctx.lock.yielding:
                        # An exclusive contender waits (a prune): once this checkpoint is
                        # durable and leased, let it in; taken again for the next run.
                        await commit
                        commit = None
                        await self._let_go()
                finally:
                    ctx.wakeups.forget(ev)
            writer = await self._take()
            end = json.loads(state.end_doc or "{}")
            if writer.block_count() != end["blocks"]:
                # Never write a point that does not hold every block the agent sent.
                raise RuntimeError(f"cycle {cyc.id}: {writer.block_count()} blocks processed, "
                                   f"{end['blocks']} acknowledged")
            begin = json.loads(cyc.begin_doc)
            async with ctx.slots:
                point = await writer.finish(end["digests"], begin["consistency"],
                                            end.get("created"))
        except CycleAborted:
            # The pack writes first: a checkpoint waiting for them ends without
            # journaling, one journaling already ends first (never cut in a transaction).
            if self.writer is not None:
                await self.writer.abort()
            await _stop(commit, cancel=False)
            mapped.clear()
            await drop_lease(ctx.vaults, cyc)
            return None
        except BaseException as e:
            # Cancel the pack writes first: a checkpoint still waiting for them fails
            # without journaling; one already journaling ends first. Cancelled (shutdown):
            # stop it too.
            if self.writer is not None:
                await self.writer.abort()
            await _stop(commit, cancel=isinstance(e, asyncio.CancelledError))
            raise
        await self._recorded(point, writer)
        return point

    async def _recorded(self, point: Point, writer: CycleWriter) -> None:
        ctx, cyc = self.ctx, self.cyc
        async with ctx.sessionmaker() as s:
            row = await s.get_one(db.Cycle, cyc.seq)
            row.state, row.point_id = db.UPLOADED, point.id
            if await s.get(db.PointReport, point.id) is None:
                s.add(db.PointReport(point_id=point.id, machine=point.machine,
                                     doc=json.dumps(point.to_json()), reported=False))
            await s.commit()
        await ctx.vaults.settle_cycle(cyc.seq)  # packs of failed attempts go
        await drop_lease(ctx.vaults, cyc)  # the point keeps its blocks now
        await self._let_go()
        ctx.metrics.points.inc()
        # Logged before the cycle's folder goes: a folder left beside an uploaded cycle
        # (a kill -9 in between) makes the next start log it (``CycleBook.recover``).
        log.info("point_uploaded", machine=cyc.machine, cycle=cyc.id, point=point.id,
                 consistency=point.consistency, stored_bytes=writer.stored_bytes,
                 logical_bytes=writer.logical_bytes)
        await asyncio.to_thread(remove_cycle_dir, self.cycle_dir)
        ctx.space.release(cyc.seq)

    async def _add_segment(self, writer: CycleWriter, path: str, mapped: list[Run]) -> None:
        segment = await asyncio.to_thread(SealedSegment, path, BATCH_BYTES, BATCH_FRAMES)
        try:
            for run in segment.map_runs():
                self.ctx.mappings.track(self.cyc.seq, run)
                mapped.append(run)
                await writer.add(run.take())
                close_released(mapped)
                self._check_withheld()
        finally:
            segment.close()

    async def _commit(self, checkpoint: asyncio.Task[list[JournalEntry]],
                      segs: list[db.Segment], mapped: list[Run], taken: set[int]) -> None:
        """Lease and journal a run of segments once its checkpoint is durable, then delete
        them."""
        ctx, cyc = self.ctx, self.cyc
        journal = await checkpoint
        close_released(mapped)
        # Leased before it is journaled: a journaled change is always leased (a crash in
        # between leaves a part that keeps a little more until the cycle ends).
        await self._lease(journal)
        # Durable in the vault and journaled before the segments go. The append is never
        # left running behind a cancelled caller (a retry reads the journal).
        await _in_thread_to_the_end(append_journal, self.cycle_dir / JOURNAL, journal)
        ctx.storage.succeeded(cyc.machine)  # the vault took a checkpoint: it is writable
        ids = [seg.id for seg in segs]
        async with ctx.sessionmaker() as s:
            await s.execute(delete(db.Segment).where(db.Segment.id.in_(ids)))
            await s.commit()
        taken.difference_update(ids)
        await asyncio.to_thread(_unlink_all, [seg.path for seg in segs])
        ctx.space.release(cyc.seq, sum(seg.size for seg in segs))
        ctx.on_checkpoint()


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
