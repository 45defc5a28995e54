"""SQLite ``database is locked`` under a burst of writers (common/sqlwrite.py).

A write transaction that waits for another one (its commit slowed by a busy disk, as when
eight agents fill the cache with their initial copies) used to poll SQLite's lock and
fail after the driver's 5 s busy timeout. The servers' writers now queue on one gate per
database, in order, and never fail while the transaction before them goes on.

Real databases (``procserver.db.open_db``, ``configserver.db.open_db``), real write
transactions of the process server (``CycleBook``), no mocks. "Slow" is a real write
transaction held open until the writer behind it is seen queued, not a sleep.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from common.sqlwrite import SelfDeadlockError, serialize_writes, write_gate
from configserver import db as cs_db
from procserver import db
from procserver.cache import SealedSegment
from procserver.cachespace import CacheSpace
from procserver.cycles import CycleBook, OpenCycle
from procserver.metrics import ProcMetrics
from procserver.models import ReceiveProgress
from procserver.supervisor import Supervisor

DEADLINE = 60.0  # a wait for a condition that does not come within it fails the test

Maker = async_sessionmaker[AsyncSession]


@pytest.fixture
async def bookkeeping(tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, Maker]]:
    engine, sm = await db.open_db(str(tmp_path / "procserver.db"))
    try:
        yield engine, sm
    finally:
        await engine.dispose()


async def _until(cond: Callable[[], bool], what: str) -> None:
    """Wait until ``cond()`` holds (state of the real gate or task), at most DEADLINE s."""
    end = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.01)


async def _held_until_queued(engine: AsyncEngine, sm: Maker, write: Callable[[AsyncSession],
                             Awaitable[None]], writer: Awaitable[None]) -> asyncio.Task[None]:
    """Run ``writer`` while a write transaction (``write``, flushed, not committed) holds
    the database, until ``writer`` is seen queued behind it (or ends); then commit.
    Returns the writer's task, done."""
    gate = write_gate(engine)
    assert gate is not None
    async with sm() as s:
        await write(s)
        await s.flush()  # the write lock is held from here to the commit
        task = asyncio.ensure_future(writer)
        await _until(lambda: task.done() or gate.waiting > 0, "the writer never queued")
        assert not task.done(), f"the writer ended while the other one held: {task}"
        await s.commit()
    async with asyncio.timeout(DEADLINE):
        await asyncio.wait([task])
    return task


def _cycle(cid: str, machine: str = "web01") -> db.Cycle:
    return db.Cycle(id=cid, machine=machine, state=db.RECEIVING, full=True, base=None,
                    begin_doc=json.dumps({"cycle": cid, "disks": []}), created=time.time())


async def _resumable(sm: Maker, cid: str, machine: str = "web01") -> int:
    """A cycle being received, as a session's BEGIN records it."""
    async with sm() as s:
        row = _cycle(cid, machine)
        s.add(row)
        await s.flush()
        s.add(ReceiveProgress(cycle_seq=row.seq, frames=0, next_segment=0))
        await s.commit()
        return row.seq


def _book(sm: Maker, tmp_path: Path, sup: Supervisor) -> CycleBook:
    space = CacheSpace(1 << 30, ProcMetrics().cache_bytes, sup.spawn)
    return CycleBook(sm, tmp_path / "cache", space, 60.0, wake_uploader=lambda: None,
                     spawn=sup.spawn)


def _open(seq: int, cid: str, tmp_path: Path) -> OpenCycle:
    doc: dict[str, Any] = {"cycle": cid, "disks": [{"name": "sda", "size": 1 << 20,
                                                    "block_size": 65536}]}
    return OpenCycle(seq, cid, "web01", doc, True, tmp_path / "cache" / "web01" / cid)


def _segment(n: int, tmp_path: Path) -> SealedSegment:
    return SealedSegment(n, tmp_path / f"{n:08d}.hrl", 1000 + n, 10 * (n + 1), (0, n))


async def test_a_writer_behind_a_long_write_transaction_waits_and_goes_through(
        bookkeeping: tuple[AsyncEngine, Maker], tmp_path: Path) -> None:
    """A session records its segments while the uploader's transaction holds the
    database (its commit slow): the record waits for it, however long, and both land."""
    engine, sm = bookkeeping
    sup = Supervisor()
    book = _book(sm, tmp_path, sup)
    seq = await _resumable(sm, "c-receiving")
    done = await _resumable(sm, "c-complete", "db01")

    async def upload_finishing(s: AsyncSession) -> None:  # the uploader's last write
        row = await s.get_one(db.Cycle, done)
        row.state, row.point_id = db.UPLOADED, "p" * 64

    writer = book.record_segments(_open(seq, "c-receiving", tmp_path),
                                  [_segment(0, tmp_path), _segment(1, tmp_path)])
    task = await _held_until_queued(engine, sm, upload_finishing, writer)
    assert task.exception() is None, task.exception()
    async with sm() as s:
        segs = (await s.execute(select(db.Segment.seq, db.Segment.size).where(
            db.Segment.cycle_seq == seq).order_by(db.Segment.seq))).all()
        p = await s.get_one(ReceiveProgress, seq)
        up = await s.get_one(db.Cycle, done)
    assert [tuple(r) for r in segs] == [(0, 1000), (1, 1001)]
    assert (p.frames, p.next_segment, p.last_disk, p.last_block) == (20, 2, 0, 1)
    assert (up.state, up.point_id) == (db.UPLOADED, "p" * 64)
    await sup.cancel()


async def test_a_burst_of_writers_queues_in_order_and_none_fails(
        bookkeeping: tuple[AsyncEngine, Maker], tmp_path: Path) -> None:
    """Eight sessions (each BEGIN, its segments, END) and aborts at once, while one long
    transaction holds the database until all of them are queued: every write lands."""
    engine, sm = bookkeeping
    gate = write_gate(engine)
    assert gate is not None
    sup = Supervisor()
    book = _book(sm, tmp_path, sup)
    seqs = [await _resumable(sm, f"c{i}", f"m{i}") for i in range(8)]
    doomed = await _resumable(sm, "c-doomed", "m-doomed")

    async def session(i: int) -> None:
        oc = _open(seqs[i], f"c{i}", tmp_path)
        for n in range(3):
            await book.record_segments(oc, [_segment(n, tmp_path)])
        async with sm() as s:  # END: read the row, then write it (as the session does)
            row = await s.get_one(db.Cycle, seqs[i])
            row.state = db.COMPLETE
            await s.delete(await s.get_one(ReceiveProgress, seqs[i]))
            await s.commit()

    async def hold(s: AsyncSession) -> None:
        s.add(_cycle("c-holder", "m-holder"))

    async def burst() -> None:
        await asyncio.gather(*(session(i) for i in range(8)), book._mark_aborted(doomed))

    async with sm() as s:
        await hold(s)
        await s.flush()
        task = asyncio.ensure_future(burst())
        await _until(lambda: task.done() or gate.waiting >= 9, "the writers never queued")
        assert not task.done(), task
        await s.commit()
    async with asyncio.timeout(DEADLINE):
        await task
    async with sm() as s:
        states = dict((await s.execute(select(db.Cycle.id, db.Cycle.state))).all())
        nsegs = (await s.execute(select(func.count()).select_from(db.Segment))).scalar_one()
    assert states == {**{f"c{i}": db.COMPLETE for i in range(8)},
                      "c-doomed": db.ABORTED, "c-holder": db.RECEIVING}
    assert nsegs == 24
    await sup.cancel()


async def test_a_read_then_write_transaction_survives_a_commit_in_between(
        bookkeeping: tuple[AsyncEngine, Maker]) -> None:
    """The reads before a transaction's first write pin no snapshot: another connection
    may commit in between and the write still goes through (no SQLITE_BUSY_SNAPSHOT)."""
    _engine, sm = bookkeeping
    seq = await _resumable(sm, "c1")
    async with sm() as a:
        row = await a.get_one(db.Cycle, seq)  # read first
        async with sm() as b:  # another writer commits meanwhile
            b.add(_cycle("c2"))
            await b.commit()
        row.state = db.ABORTED  # then write
        await a.commit()
    async with sm() as s:
        assert (await s.get_one(db.Cycle, seq)).state == db.ABORTED


async def test_a_second_write_of_the_same_task_is_refused_at_once_and_frees_nothing(
        bookkeeping: tuple[AsyncEngine, Maker]) -> None:
    """A task writing through a second session while its first write transaction is open
    would wait for itself: refused at once, with a hint; the first one still commits and
    the gate is free afterwards."""
    engine, sm = bookkeeping
    gate = write_gate(engine)
    assert gate is not None
    async with sm() as first:
        first.add(_cycle("c1"))
        await first.flush()
        async with sm() as second:
            second.add(_cycle("c2"))
            with pytest.raises(SelfDeadlockError, match="commit or roll back the first"):
                await second.flush()
        await first.commit()
    assert gate.holder is None and gate.waiting == 0
    async with sm() as s:  # a failed write (duplicate id) gives the gate back too
        s.add(_cycle("c1"))
        with pytest.raises(Exception, match="UNIQUE"):
            await s.commit()
    async with sm() as s:
        s.add(_cycle("c3"))
        await s.commit()
        ids = (await s.execute(select(db.Cycle.id).order_by(db.Cycle.id))).scalars().all()
    assert ids == ["c1", "c3"]
    assert gate.holder is None and gate.waiting == 0


async def test_a_writer_cancelled_while_queued_leaves_the_gate_and_database_usable(
        bookkeeping: tuple[AsyncEngine, Maker]) -> None:
    """A session cancelled while its write waits for its turn (an agent gone, a stop):
    its connection is dropped, nothing it meant to write lands, and the next writers
    (the holder's commit, another session) go through."""
    engine, sm = bookkeeping
    gate = write_gate(engine)
    assert gate is not None

    async def late() -> None:
        async with sm() as s:
            s.add(_cycle("c-cancelled"))
            await s.commit()

    async with sm() as holder:
        holder.add(_cycle("c1"))
        await holder.flush()
        task = asyncio.ensure_future(late())
        await _until(lambda: gate.waiting == 1, "the writer never queued")
        task.cancel()
        async with asyncio.timeout(DEADLINE):
            await asyncio.wait([task])
        assert task.cancelled()
        await holder.commit()
    async with sm() as s:
        s.add(_cycle("c2"))
        await s.commit()
        ids = (await s.execute(select(db.Cycle.id).order_by(db.Cycle.id))).scalars().all()
    assert ids == ["c1", "c2"]
    assert gate.holder is None and gate.waiting == 0


async def test_a_writer_that_never_gets_its_turn_fails_clearly_and_changes_nothing(
        bookkeeping: tuple[AsyncEngine, Maker], tmp_path: Path) -> None:
    """Past the gate's wait the writer fails with ``database is locked`` naming the wait,
    as SQLite's busy timeout would (a gate of 0.2 s, on the same database file)."""
    _engine, sm = bookkeeping
    other = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'procserver.db'}")
    serialize_writes(other, 0.2)
    other_sm = async_sessionmaker(other, expire_on_commit=False)
    try:
        async with other_sm() as holder:
            holder.add(_cycle("c1"))
            await holder.flush()
            async with other_sm() as late:
                late.add(_cycle("c2"))
                with pytest.raises(OperationalError,
                                   match=r"database is locked: no write transaction could "
                                         r"start within 0\.2 s"):
                    await asyncio.ensure_future(late.flush())
            await holder.commit()
    finally:
        await other.dispose()
    async with sm() as s:
        assert (await s.execute(select(db.Cycle.id))).scalars().all() == ["c1"]


async def test_the_configuration_catalog_queues_its_writers_too(tmp_path: Path) -> None:
    """The configuration server's SQLite catalog is opened the same way: a write behind a
    long write transaction waits for it and lands."""
    engine, sm = await cs_db.open_db(f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}")

    def point(pid: str) -> cs_db.RecoveryPoint:
        return cs_db.RecoveryPoint(id=pid, machine="web01", created=f"2026-12-06T00:0{pid[-1]}",
                                   consistency="crash", doc="{}", received=time.time())

    async def record(pid: str) -> None:
        async with sm() as s:
            s.add(point(pid))
            await s.commit()

    async def hold(s: AsyncSession) -> None:
        s.add(point("p1"))

    try:
        task = await _held_until_queued(engine, sm, hold, record("p2"))
        assert task.exception() is None, task.exception()
        async with sm() as s:
            ids = (await s.execute(select(cs_db.RecoveryPoint.id).order_by(
                cs_db.RecoveryPoint.id))).scalars().all()
        assert ids == ["p1", "p2"]
    finally:
        await engine.dispose()


async def test_a_read_for_update_waits_for_the_read_modify_write_before_it(
        tmp_path: Path) -> None:
    """SQLite has no row locks and SQLAlchemy leaves ``FOR UPDATE`` out for it: two
    read-modify-writes of one catalog row (``with_for_update``) used to both read the old
    value, and the later commit undid the earlier one. The read for update now queues on
    the gate behind the transaction that read first, and sees its commit; plain reads
    still never wait."""
    engine, sm = await cs_db.open_db(f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}")
    gate = write_gate(engine)
    assert gate is not None
    seen: list[int] = []

    async def increment() -> None:
        async with sm() as s:
            row = await s.get(cs_db.Policy, "p", with_for_update=True)
            assert row is not None
            seen.append(row.rpo_threshold_s)
            row.rpo_threshold_s += 1
            await s.commit()

    try:
        async with sm() as s:
            s.add(cs_db.Policy(name="p", rpo_threshold_s=0, retention_hours=1,
                               app_consistent_frequency_s=0, crash_consistent_interval_s=60,
                               block_size=65536, created=0.0, updated=0.0))
            await s.commit()
        async with sm() as s:
            row = await s.get(cs_db.Policy, "p", with_for_update=True)
            assert row is not None and gate.holder is asyncio.current_task()
            task = asyncio.ensure_future(increment())
            await _until(lambda: task.done() or gate.waiting > 0, "the second never queued")
            assert not task.done(), "the second read-modify-write did not wait for the first"
            async with sm() as reader:  # a plain read goes on meanwhile
                plain = await reader.get(cs_db.Policy, "p")
                assert plain is not None and plain.rpo_threshold_s == 0
            row.rpo_threshold_s += 1
            await s.commit()
        async with asyncio.timeout(DEADLINE):
            await task
        assert seen == [1]
        async with sm() as s:
            final = await s.get(cs_db.Policy, "p")
            assert final is not None and final.rpo_threshold_s == 2
    finally:
        await engine.dispose()
