"""One agent session on port 9443: validate, cache durably, acknowledge; resume.

The event loop only reads the network here: frames are parsed in the receive
buffers (``wire.FrameStream``), checked, and handed in runs to the cycle's
``SegmentSink``, whose thread appends them to the HRL segments. A segment is
recorded (its row, and for a resumable cycle the cycle's durable progress, in one
transaction) only after it is fsynced; SYNC and END wait until every segment is
recorded, so PROGRESS and ACK only ever name durable frames.

A cycle begun by an agent that speaks ``resume`` survives its connection: when the
session ends without END for any reason but bad input (a reset, a close, a
truncated frame, a timeout, a shutdown), what arrived is sealed and the cycle is
**suspended**, not aborted. The agent reconnects with ``RESUME``, learns how many
frames are durable and the highest block among them, and goes on after it. A
suspended cycle is aborted when its machine begins a new one, when a newer cycle
of its machine exists, or after ``resume_window_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import ForeignKey, Integer, select
from sqlalchemy.orm import Mapped, mapped_column

from procserver import db
from procserver.basis import serve_basis
from procserver.cache import SEGMENT_MAGIC, SegmentSink, SinkError
from procserver.checks import is_id, validate_begin, validate_end
from procserver.wire import (
    BLOCK_HEAD,
    DATA,
    FEATURES,
    HEADER,
    HEARTBEAT_FRAME,
    FrameStream,
    FrameType,
    ProtocolError,
    RawFrame,
    encode_json,
    error_frame,
    features_of,
)

if TYPE_CHECKING:
    from procserver.server import ProcServer

log = structlog.get_logger("procserver.session")
HANDSHAKE_TIMEOUT = 15.0
RUN_BYTES = 1 << 20  # a run of frames is handed over at least this often
# Errors after which a resumable cycle is suspended instead of aborted: the peer went
# away or fell silent, or the server is shutting down; not bad input.
RESUMABLE_CODES = ("truncated", "timeout")


class ReceiveProgress(db.Base):
    """The durable part of a resumable cycle still being received (one row per cycle).

    Updated in the same transaction as each segment's row: ``frames`` and the highest
    ``(last_disk, last_block)`` among them are exactly what the recorded segments hold.
    """

    __tablename__ = "receive_progress"
    cycle_seq: Mapped[int] = mapped_column(ForeignKey("cycles.seq"), primary_key=True)
    frames: Mapped[int] = mapped_column(Integer, default=0)
    last_disk: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_block: Mapped[int | None] = mapped_column(Integer, nullable=True)
    next_segment: Mapped[int] = mapped_column(Integer, default=0)


OPEN, COMPLETE, ABORTED = "open", "complete", "aborted"


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


def _disconnected(e: BaseException) -> bool:
    """The session ended because the peer went away or the server stops: not bad input."""
    if isinstance(e, ProtocolError):
        return e.code in RESUMABLE_CODES
    return isinstance(e, asyncio.CancelledError | ConnectionError | TimeoutError | OSError) \
        and not isinstance(e, SinkError)


class Session:
    def __init__(self, server: ProcServer, stream: FrameStream, machine: str,
                 peer: str) -> None:
        self.server, self.stream, self.machine = server, stream, machine
        self.log = log.bind(machine=machine, peer=peer)
        self.features: frozenset[str] = frozenset()
        self.last_sent = time.monotonic()

    async def send(self, data: bytes) -> None:
        self.stream.write(data)
        self.last_sent = time.monotonic()
        await self.stream.drain()

    async def next_control(self, timeout: float) -> RawFrame:
        """The next frame that is not a HEARTBEAT."""
        while True:
            f = await self.stream.next_frame(timeout)
            if f.type != FrameType.HEARTBEAT:
                return f
            self.server.metrics.heartbeats_received.inc()

    async def run(self) -> None:
        cfg = self.server.cfg
        timeout = cfg.idle_timeout_seconds
        hello = await self.stream.read_frame(min(HANDSHAKE_TIMEOUT, timeout))
        if hello.type != FrameType.HELLO:
            raise ProtocolError("expected_hello", f"expected HELLO, got {hello.type.name}")
        doc = hello.json()
        claimed = doc.get("machine")
        if claimed != self.machine:
            raise ProtocolError(
                "wrong_machine",
                f"the client certificate is for machine {self.machine!r}, "
                f"not {claimed!r}: a machine may write only its own disks")
        # Revoked, disabled, removed: refused here, before anything is written.
        transport = self.stream.transport
        await self.server.trust.authorize(
            self.machine, transport.get_extra_info("peercert") if transport else None)
        self.features = features_of(doc) & frozenset(FEATURES)
        welcome: dict[str, Any] = {"server": "siterecovery-procserver",
                                   "max_frame": self.server.max_frame}
        if self.features:
            welcome.update(features=sorted(self.features),
                           heartbeat_seconds=self.server.heartbeat_seconds,
                           idle_timeout_seconds=timeout)
        await self.send(encode_json(FrameType.WELCOME, welcome))
        self.log.info("session_started", features=sorted(self.features))
        beats = asyncio.create_task(self._heartbeats()) if "heartbeat" in self.features \
            else None
        try:
            while True:
                try:
                    frame = await self.next_control(timeout)
                except ConnectionResetError:
                    return
                if frame.type == FrameType.BEGIN:
                    await self.begin(frame.frame().json())
                elif frame.type == FrameType.RESUME:
                    await self.resume(frame.frame().json())
                elif frame.type == FrameType.BASIS and "resync" in self.features:
                    await serve_basis(self, frame.frame().json())
                else:
                    raise ProtocolError("expected_begin",
                                        f"expected BEGIN, got {frame.type.name}")
        finally:
            if beats is not None:
                beats.cancel()
                await asyncio.gather(beats, return_exceptions=True)

    async def _heartbeats(self) -> None:
        """While this side sends nothing else, a HEARTBEAT every ``heartbeat_seconds``."""
        every = self.server.heartbeat_seconds
        while True:
            await asyncio.sleep(max(0.0, self.last_sent + every - time.monotonic()))
            if time.monotonic() - self.last_sent >= every:
                try:
                    self.stream.write(HEARTBEAT_FRAME)
                except ConnectionError:
                    return
                self.last_sent = time.monotonic()
                self.server.metrics.heartbeats_sent.inc()

    # -- starting and resuming a cycle ------------------------------------------------
    async def _base_ok(self, doc: dict[str, Any]) -> bool:
        if doc["full"]:
            return True
        async with self.server.sessionmaker() as s:
            base = (await s.execute(select(db.Cycle).where(
                db.Cycle.id == doc["base"], db.Cycle.machine == self.machine,
                db.Cycle.state.in_([db.COMPLETE, db.UPLOADED])))).scalar_one_or_none()
        if base is None:
            return False
        if base.point_id is not None and not await self.server.vault.has_point(base.point_id):
            return False  # pruned: a delta on it could not be resolved
        old = {d["name"]: (d["size"], d["block_size"])
               for d in json.loads(base.begin_doc)["disks"]}
        new = {d["name"]: (d["size"], d["block_size"]) for d in doc["disks"]}
        return old == new

    async def begin(self, doc: dict[str, Any]) -> None:
        validate_begin(doc)
        await self.server.trust.authorize_disks(self.machine,
                                                [d["name"] for d in doc["disks"]])
        if not await self._base_ok(doc):
            await self.send(error_frame(
                "resync_required", f"base cycle {doc.get('base')!r} is unknown here "
                "or the disk layout changed", "send a full cycle"))
            return
        resumable = "resume" in self.features
        async with self.server.sessionmaker() as s:
            exists = (await s.execute(select(db.Cycle).where(db.Cycle.id == doc["cycle"]))
                      ).scalar_one_or_none()
            if exists is not None:
                raise ProtocolError("duplicate_cycle", f"cycle {doc['cycle']} was already sent")
            row = db.Cycle(id=doc["cycle"], machine=self.machine, state=db.RECEIVING,
                           full=doc["full"], base=doc.get("base"), begin_doc=json.dumps(doc),
                           created=time.time())
            s.add(row)
            await s.flush()
            if resumable:
                s.add(ReceiveProgress(cycle_seq=row.seq, frames=0, next_segment=0))
            await s.commit()
            cycle_seq = row.seq
        # The agent started over: a suspended cycle of this machine will never be resumed.
        await self.server.supersede(self.machine, cycle_seq)
        oc = OpenCycle(cycle_seq, doc["cycle"], self.machine, doc, resumable,
                       self.server.cache_dir / self.machine / doc["cycle"])
        self.server.open_cycles[oc.id] = oc
        async with oc.lock:
            await self.send(encode_json(FrameType.READY, {"cycle": doc["cycle"]}))
            self.server.uploader.wake()
            await self.receive(oc)

    async def resume(self, doc: dict[str, Any]) -> None:
        cycle = doc.get("cycle")
        if not is_id(cycle):
            raise ProtocolError("bad_resume", "RESUME needs the 'cycle' id to continue")
        assert isinstance(cycle, str)
        oc = self.server.open_cycles.get(cycle)
        if oc is not None and oc.machine == self.machine and oc.resumable:
            owner = oc.owner
            if owner is not None and not owner.done() and not oc.detaching:
                # A session the agent gave up on (it cannot tell us): take the cycle over.
                self.log.info("cycle_taken_over", cycle=cycle)
                owner.cancel()
            async with oc.lock:
                if oc.state == OPEN and oc.suspended_at is not None and \
                        time.monotonic() - oc.suspended_at >= \
                        self.server.cfg.resume_window_seconds:
                    await self.server.abort_cycle(oc, "resume window passed")
                if oc.state == OPEN:
                    oc.suspended_at = None
                    if oc.expiry is not None:
                        oc.expiry.cancel()
                        oc.expiry = None
                    await self.send(encode_json(FrameType.PROGRESS, {
                        "cycle": cycle, "blocks": oc.frames, "position": oc.position()}))
                    self.server.metrics.resumed_cycles.inc()
                    self.log.info("cycle_resumed", cycle=cycle, blocks=oc.frames,
                                  position=oc.position())
                    oc.floor = oc.last
                    await self.receive(oc)
                    return
        async with self.server.sessionmaker() as s:
            row = (await s.execute(select(db.Cycle).where(
                db.Cycle.id == cycle, db.Cycle.machine == self.machine))).scalar_one_or_none()
        if row is not None and row.state in (db.COMPLETE, db.UPLOADED):
            # Complete: the ACK was lost on the way. Acknowledge it again.
            await self.send(encode_json(FrameType.ACK, {"cycle": cycle}))
            return
        await self.send(error_frame(
            "cannot_resume", f"cycle {cycle} cannot be resumed here (unknown, aborted, or "
            "past its resume window)", "begin a new cycle"))

    # -- receiving ------------------------------------------------------------------
    async def receive(self, oc: OpenCycle) -> None:
        """Receive frames of ``oc`` until END (called with ``oc.lock`` held).

        Every await comes either before a frame changes any state or after it is part
        of the run, and a run changes ``oc.frames``/``oc.last`` only once it is queued:
        whatever interrupts the session, ``oc`` describes exactly the frames queued.
        """
        server = self.server
        oc.owner = asyncio.current_task()
        server.receiving += 1
        sink = SegmentSink(oc.cycle_dir, budget=server.sink_budget, limit=server.rate_limit,
                           record=lambda segs: server.record_segments(oc, segs),
                           on_queued=server.note_queued)
        seg_size = 0  # bytes in the open segment (0: none open)
        seg_limit = server.cfg.segment_bytes
        run = _Run(oc.last)
        limits, seen, floor = oc.limits, oc.seen, oc.floor
        complete = False
        timeout = server.cfg.idle_timeout_seconds

        async def flush_run(wait: bool = True) -> None:
            views = run.views()
            if not views:
                return
            if not run.reserved:
                await server.reserve_cache(oc.seq, run.nbytes, wait=wait)
                run.reserved = True
            await sink.write(oc.next_segment, views, run.nbytes)
            oc.frames += run.frames
            oc.last = run.last
            server.metrics.received_bytes.inc(run.data)
            run.clear()

        def close_segment() -> None:
            nonlocal seg_size
            sink.close_segment(oc.next_segment, oc.frames, oc.last)
            oc.next_segment += 1
            seg_size = 0

        try:
            while True:
                f = self.stream.pop()
                if f is None:
                    await flush_run()
                    f = await self.stream.next_frame(timeout)
                t = f.type
                if t in DATA:
                    d, n = f.block_head()
                    if d >= len(limits) or n >= limits[d][0]:
                        raise ProtocolError("bad_block", f"block {d}:{n} lies outside the disks")
                    _nblocks, bs, size = limits[d]
                    data_len = f.size - HEADER.size - BLOCK_HEAD.size
                    want = min(bs, size - n * bs) if t == FrameType.BLOCK else 0
                    if data_len != want:
                        raise ProtocolError("bad_block",
                                            f"block {d}:{n} has {data_len} bytes, not {want}")
                    if seen[d][n >> 3] & (1 << (n & 7)) or \
                            (floor is not None and (d, n) <= floor):
                        raise ProtocolError("bad_block", f"block {d}:{n} was sent twice")
                    if seg_size == 0:
                        await server.reserve_cache(oc.seq, len(SEGMENT_MAGIC))
                        seg_size = len(SEGMENT_MAGIC)
                    # No await from here until the frame is in the run.
                    seen[d][n >> 3] |= 1 << (n & 7)
                    run.add(f, (d, n), data_len)
                    seg_size += f.size
                    if seg_size >= seg_limit:
                        await flush_run()
                        close_segment()
                    elif run.nbytes >= RUN_BYTES:
                        await flush_run()
                elif t == FrameType.HEARTBEAT:
                    server.metrics.heartbeats_received.inc()
                elif t == FrameType.SYNC:
                    if f.frame().json().get("cycle") != oc.id:
                        raise ProtocolError("bad_sync", "SYNC must name the cycle being sent")
                    await flush_run()
                    if seg_size:
                        close_segment()
                    await sink.sync()
                    await self.send(encode_json(FrameType.PROGRESS, {
                        "cycle": oc.id, "blocks": oc.frames, "position": oc.position()}))
                elif t == FrameType.END:
                    end = f.frame().json()
                    await flush_run()
                    validate_end(end, oc.id, oc.doc["disks"], oc.frames)
                    if seg_size:
                        close_segment()
                    await sink.sync()
                    async with server.sessionmaker() as s:
                        row = await s.get_one(db.Cycle, oc.seq)
                        row.state, row.end_doc = db.COMPLETE, json.dumps(end)
                        progress = await s.get(ReceiveProgress, oc.seq)
                        if progress is not None:
                            await s.delete(progress)
                        await s.commit()
                    # From here the cycle is durable and will become a point, whether or
                    # not the ACK reaches the agent: it must never be aborted.
                    complete = True
                    oc.state = COMPLETE
                    server.open_cycles.pop(oc.id, None)
                    server.uploader.wake()
                    await self.send(encode_json(FrameType.ACK, {"cycle": oc.id}))
                    self.log.info("cycle_acknowledged", cycle=oc.id,
                                  segments=oc.next_segment, blocks=oc.frames)
                    return
                else:
                    raise ProtocolError("unexpected_frame",
                                        f"{t.name} is not valid inside a cycle")
        except SinkError as e:  # the cache disk is full or failing: tell the agent
            await _uncancellable(self._abandon(oc, sink))
            raise ProtocolError("cache_failed", f"{e}; the cycle was dropped, retry "
                                                "later") from e
        except BaseException as e:
            if not complete:
                oc.detaching = True

                async def settle(e: BaseException) -> None:
                    if oc.resumable and _disconnected(e):
                        try:
                            # Seal everything that arrived whole: the agent resumes after it.
                            await flush_run(wait=False)
                            if seg_size:
                                close_segment()
                            await sink.sync()
                            await sink.stop()
                        except BaseException as e2:
                            self.log.warning("cycle_suspend_failed", cycle=oc.id,
                                             error=str(e2) or type(e2).__name__)
                            await _quietly(sink.stop())
                            await server.abort_cycle(oc)
                        else:
                            await server.suspend(oc, reason=str(e) or type(e).__name__)
                    else:
                        await _quietly(sink.stop())
                        await server.abort_cycle(oc)

                # Bounded work (what was queued is written and fsynced) that must finish
                # before the cycle is let go, even if this task is cancelled meanwhile.
                await _uncancellable(settle(e))
            raise
        finally:
            await _quietly(sink.stop())
            oc.owner = None
            oc.detaching = False
            server.receiving -= 1


    async def _abandon(self, oc: OpenCycle, sink: SegmentSink) -> None:
        await _quietly(sink.stop())
        try:
            await self.server.abort_cycle(oc, "cache write failed")
        except Exception as e:  # the database may sit on the same full disk
            self.log.error("cycle_abort_failed", cycle=oc.id, error=str(e))


class _Run:
    """Whole, checked frames not yet handed to the cache writer (adjacent ones merged)."""

    __slots__ = ("buf", "data", "end", "frames", "last", "nbytes", "reserved", "start",
                 "views_")

    def __init__(self, last: tuple[int, int] | None) -> None:
        self.last = last
        self.views_: list[memoryview] = []
        self.buf: bytearray | None = None
        self.start = self.end = self.nbytes = self.frames = self.data = 0
        self.reserved = False

    def add(self, f: RawFrame, pos: tuple[int, int], data_len: int) -> None:
        if f.buf is self.buf and f.start == self.end:
            self.end = f.end
        else:
            if self.buf is not None:
                self.views_.append(memoryview(self.buf)[self.start:self.end])
            self.buf, self.start, self.end = f.buf, f.start, f.end
        self.nbytes += f.size
        self.frames += 1
        self.data += data_len
        if self.last is None or pos > self.last:
            self.last = pos

    def views(self) -> list[memoryview]:
        if self.buf is not None:
            self.views_.append(memoryview(self.buf)[self.start:self.end])
            self.buf = None
        return self.views_

    def clear(self) -> None:
        self.views_ = []
        self.buf = None
        self.nbytes = self.frames = self.data = 0
        self.reserved = False


async def _uncancellable(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end even if the caller is cancelled; then re-raise that."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


async def _quietly(aw: Awaitable[None]) -> None:
    try:
        await aw
    except Exception as e:
        log.warning("cache_writer_stop_failed", error=str(e) or type(e).__name__)
