"""Receiving one cycle's frames on a session (``receive_cycle``), from READY to ACK.

The event loop only reads the network here: frames are parsed in the receive buffers
(``framestream.FrameStream``), checked (inside the disks, the right length, never twice)
and handed in runs to the cycle's ``SegmentSink``, whose thread appends them to the HRL
segments. SYNC and END wait until every closed segment is fsynced and recorded, so
PROGRESS and ACK only ever name durable frames; END marks the cycle COMPLETE in the
catalog before the ACK leaves.

``FrameRun`` gathers the checked BLOCK/ZERO frames not yet handed to the cache writer,
merging frames that lie back to back in one receive buffer into one view. When a
session ends, letting go of its cycle (sealing what arrived, or aborting) runs through
``uncancellable`` (bounded work that must finish even if the session's task is
cancelled meanwhile) and ``quietly`` (stopping the cache writer must not raise).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from procserver import db
from procserver.cache import SEGMENT_MAGIC, SegmentSink, SinkError
from procserver.cycles import COMPLETE, OpenCycle, dropped_error
from procserver.framestream import RawFrame
from procserver.models import ReceiveProgress
from wire.checks import validate_end
from wire.protocol import BLOCK_HEAD, DATA, HEADER, FrameType, ProtocolError, encode_json

if TYPE_CHECKING:
    from procserver.session import Session

log = structlog.get_logger("procserver.session")
RUN_BYTES = 1 << 20  # a run of frames is handed over at least this often
# Errors after which a resumable cycle is suspended instead of aborted: the peer went
# away or fell silent, or the server is shutting down; not bad input.
RESUMABLE_CODES = ("truncated", "timeout")


def _disconnected(e: BaseException) -> bool:
    """The session ended because the peer went away or the server stops: not bad input."""
    if isinstance(e, ProtocolError):
        return e.code in RESUMABLE_CODES
    return isinstance(e, asyncio.CancelledError | ConnectionError | TimeoutError | OSError) \
        and not isinstance(e, SinkError)


class FrameRun:
    """Whole, checked frames not yet handed to the cache writer (adjacent ones merged)."""

    __slots__ = ("buf", "data", "end", "frames", "last", "nbytes", "reserved", "start",
                 "views_")

    def __init__(self, last: tuple[int, int] | None) -> None:
        self.last = last
        self.views_: list[memoryview] = []
        self.buf: bytearray | None = None
        self.start = self.end = self.nbytes = self.frames = self.data = 0
        self.reserved = False  # its cache space is accounted already

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


async def uncancellable(coro: Coroutine[Any, Any, None]) -> None:
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


async def quietly(aw: Awaitable[None]) -> None:
    """Await ``aw`` (a cache writer's ``stop``); a failure is logged, not raised."""
    try:
        await aw
    except Exception as e:
        log.warning("cache_writer_stop_failed", error=str(e) or type(e).__name__)


async def receive_cycle(session: Session, oc: OpenCycle) -> None:
    """Receive frames of ``oc`` on ``session`` until END (called with ``oc.lock`` held).

    Every await comes either before a frame changes any state or after it is part
    of the run, and a run changes ``oc.frames``/``oc.last`` only once it is queued:
    whatever interrupts the session, ``oc`` describes exactly the frames queued.
    """
    deps, stream, slog = session.deps, session.stream, session.log
    cycles, space, buffers, metrics = deps.cycles, deps.space, deps.buffers, deps.metrics
    oc.owner = asyncio.current_task()
    oc.interrupt = stream.interrupt
    buffers.receiving += 1
    sink = SegmentSink(oc.cycle_dir, budget=buffers.sink_budget, limit=deps.rate_limit,
                       record=lambda segs: cycles.record_segments(oc, segs),
                       on_queued=buffers.note_queued)
    seg_size = 0  # bytes in the open segment (0: none open)
    seg_limit = deps.settings.segment_bytes
    run = FrameRun(oc.last)
    limits, seen, floor = oc.limits, oc.seen, oc.floor
    complete = False
    timeout = deps.settings.idle_timeout

    async def flush_run(wait: bool = True) -> None:
        nonlocal seg_size
        views = run.views()
        if not views:
            return
        if not run.reserved:
            open_bytes = seg_size - run.nbytes  # the open segment's, this run left out
            if wait and not space.fits(run.nbytes) and \
                    len(SEGMENT_MAGIC) < open_bytes and space.held(oc.seq) <= open_bytes:
                # No room, and nothing of this cycle can drain to make some: all it holds
                # is its open segment, which the uploader takes only once sealed. Seal it
                # now — sessions whose open segments alone fill the quota would wait on
                # each other for ever — and go on in a new one.
                slog.info("segment_sealed_early", cycle=oc.id, segment=oc.next_segment,
                          bytes=open_bytes, cache_bytes=space.used, quota=space.quota)
                close_segment()
                await space.reserve(oc.seq, len(SEGMENT_MAGIC))
                seg_size = len(SEGMENT_MAGIC) + run.nbytes
            await space.reserve(oc.seq, run.nbytes, wait=wait)
            run.reserved = True
        await sink.write(oc.next_segment, views, run.nbytes)
        oc.frames += run.frames
        oc.last = run.last
        metrics.received_bytes.inc(run.data)
        run.clear()

    def close_segment() -> None:
        nonlocal seg_size
        sink.close_segment(oc.next_segment, oc.frames, oc.last)
        oc.next_segment += 1
        seg_size = 0

    try:
        while True:
            f = stream.pop()
            if f is None:
                await flush_run()
                f = await stream.next_frame(timeout)
            if oc.dropped is not None:
                raise dropped_error(oc)
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
                    await space.reserve(oc.seq, len(SEGMENT_MAGIC))
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
                metrics.heartbeats_received.inc()
            elif t == FrameType.SYNC:
                if f.frame().json().get("cycle") != oc.id:
                    raise ProtocolError("bad_sync", "SYNC must name the cycle being sent")
                await flush_run()
                if seg_size:
                    close_segment()
                await sink.sync()
                await session.send(encode_json(FrameType.PROGRESS, {
                    "cycle": oc.id, "blocks": oc.frames, "position": oc.position()}))
            elif t == FrameType.END:
                end = f.frame().json()
                await flush_run()
                validate_end(end, oc.id, oc.doc["disks"], oc.frames)
                if seg_size:
                    close_segment()
                await sink.sync()
                async with deps.sessionmaker() as s:
                    row = await s.get_one(db.Cycle, oc.seq, with_for_update=True)
                    if row.state != db.RECEIVING:
                        # The uploader dropped it meanwhile (its base point or blocks
                        # it names left the vault): an ACK would promise a point that
                        # can never be.
                        raise ProtocolError(
                            "cycle_dropped", f"cycle {oc.id} was dropped while it was "
                            "received: what it builds on is gone from the vault; the "
                            "agent's next cycle is refused and resyncs")
                    row.state, row.end_doc = db.COMPLETE, json.dumps(end)
                    progress = await s.get(ReceiveProgress, oc.seq)
                    if progress is not None:
                        await s.delete(progress)
                    await s.commit()
                # From here the cycle is durable and will become a point, whether or
                # not the ACK reaches the agent: it must never be aborted.
                complete = True
                oc.state = COMPLETE
                cycles.open.pop(oc.id, None)
                deps.uploader.wake()
                await session.send(encode_json(FrameType.ACK, {"cycle": oc.id}))
                slog.info("cycle_acknowledged", cycle=oc.id,
                              segments=oc.next_segment, blocks=oc.frames)
                return
            else:
                raise ProtocolError("unexpected_frame",
                                    f"{t.name} is not valid inside a cycle")
    except SinkError as e:  # the cache disk is full or failing: tell the agent
        await uncancellable(_abandon(session, oc, sink))
        raise ProtocolError("cache_failed", f"{e}; the cycle was dropped, retry "
                                            "later") from e
    except BaseException as e:
        if not complete:
            oc.detaching = True

            async def settle(e: BaseException) -> None:
                if oc.resumable and _disconnected(e) and oc.dropped is None:
                    try:
                        # Seal everything that arrived whole: the agent resumes after it.
                        await flush_run(wait=False)
                        if seg_size:
                            close_segment()
                        await sink.sync()
                        await sink.stop()
                    except BaseException as e2:
                        slog.warning("cycle_suspend_failed", cycle=oc.id,
                                         error=str(e2) or type(e2).__name__)
                        await quietly(sink.stop())
                        await cycles.abort(oc)
                    else:
                        await cycles.suspend(oc, reason=str(e) or type(e).__name__)
                else:
                    await quietly(sink.stop())
                    reason = f"dropped: {oc.dropped}" if oc.dropped is not None \
                        else "superseded" if oc.superseded else ""
                    await cycles.abort(oc, reason)

            # Bounded work (what was queued is written and fsynced) that must finish
            # before the cycle is let go, even if this task is cancelled meanwhile.
            await uncancellable(settle(e))
        raise
    finally:
        await quietly(sink.stop())
        oc.owner = oc.interrupt = None
        stream.interrupt(None)
        oc.detaching = False
        buffers.receiving -= 1


async def _abandon(session: Session, oc: OpenCycle, sink: SegmentSink) -> None:
    """The cache writer failed: stop it and abort the cycle."""
    await quietly(sink.stop())
    try:
        await session.deps.cycles.abort(oc, "cache write failed")
    except Exception as e:  # the database may sit on the same full disk
        session.log.error("cycle_abort_failed", cycle=oc.id, error=str(e))
