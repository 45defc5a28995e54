"""One agent session on port 9443: the handshake, then BEGIN, RESUME or a request.

HELLO is checked against the client certificate and the machine's trust, WELCOME
names the features both sides speak, and the session then serves what the agent asks:
a cycle (BEGIN, or RESUME of a suspended one: its frames are received by
``receive.receive_cycle``, which caches them durably and acknowledges), a resync's
BASIS, a restore's FETCH, a group's BARRIER. A segment is recorded (its row, and for a
resumable cycle the cycle's durable progress, in one transaction) only after it is
fsynced; SYNC and END wait until every segment is recorded, so PROGRESS and ACK only
ever name durable frames.

A cycle begun by an agent that speaks ``resume`` survives its connection: when the
session ends without END for any reason but bad input (a reset, a close, a
truncated frame, a timeout, a shutdown), what arrived is sealed and the cycle is
**suspended**, not aborted. The agent reconnects with ``RESUME``, learns how many
frames are durable and the highest block among them, and goes on after it. A
suspended cycle is aborted when its machine begins a new one, when a newer cycle
of its machine exists, or after ``resume_window_seconds`` (``cycles.CycleBook``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog
from sqlalchemy import select

from common.names import is_id
from procserver import db
from procserver.barrier import serve_barrier
from procserver.basis import serve_basis
from procserver.cycles import OPEN, OpenCycle
from procserver.fetch import serve_fetch
from procserver.framestream import FrameStream, RawFrame
from procserver.models import ReceiveProgress
from procserver.receive import receive_cycle
from procserver.sessiondeps import SessionDeps
from vault.errors import TransientStoreError
from wire.checks import validate_begin
from wire.protocol import (
    FEATURES,
    HEARTBEAT_FRAME,
    FrameType,
    ProtocolError,
    encode_json,
    error_frame,
    features_of,
)

log = structlog.get_logger("procserver.session")
HANDSHAKE_TIMEOUT = 15.0



class Session:
    def __init__(self, deps: SessionDeps, stream: FrameStream, machine: str,
                 peer: str) -> None:
        self.deps, self.stream, self.machine = deps, stream, machine
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
            self.deps.metrics.heartbeats_received.inc()

    async def run(self) -> None:
        settings = self.deps.settings
        timeout = settings.idle_timeout
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
        await self.deps.trust.authorize(
            self.machine, transport.get_extra_info("peercert") if transport else None)
        self.features = features_of(doc) & frozenset(FEATURES)
        welcome: dict[str, Any] = {"server": "siterecovery-procserver",
                                   "max_frame": settings.max_frame}
        if self.features:
            welcome.update(features=sorted(self.features),
                           heartbeat_seconds=settings.heartbeat_seconds,
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
                elif frame.type == FrameType.FETCH and "restore" in self.features:
                    await serve_fetch(self, frame.frame().json())
                elif frame.type == FrameType.BARRIER and "group" in self.features:
                    await serve_barrier(self, frame.frame().json())
                else:
                    raise ProtocolError("expected_begin",
                                        f"expected BEGIN, got {frame.type.name}")
        finally:
            if beats is not None:
                beats.cancel()
                await asyncio.gather(beats, return_exceptions=True)

    async def _heartbeats(self) -> None:
        """While this side sends nothing else, a HEARTBEAT every ``heartbeat_seconds``."""
        every = self.deps.settings.heartbeat_seconds
        while True:
            await asyncio.sleep(max(0.0, self.last_sent + every - time.monotonic()))
            if time.monotonic() - self.last_sent >= every:
                try:
                    self.stream.write(HEARTBEAT_FRAME)
                except ConnectionError:
                    return
                self.last_sent = time.monotonic()
                self.deps.metrics.heartbeats_sent.inc()

    # -- starting and resuming a cycle ------------------------------------------------
    async def _base_ok(self, doc: dict[str, Any]) -> bool:
        if doc["full"]:
            return True
        async with self.deps.sessionmaker() as s:
            base = (await s.execute(select(db.Cycle).where(
                db.Cycle.id == doc["base"], db.Cycle.machine == self.machine,
                db.Cycle.state.in_([db.COMPLETE, db.UPLOADED])))).scalar_one_or_none()
        if base is None:
            return False
        vaults = self.deps.vaults
        if base.point_id is not None and vaults.ready.is_set():
            try:
                if not await vaults.vault.has_point(base.point_id):
                    return False  # pruned: a delta on it could not be resolved
            except TransientStoreError:
                # The storage does not answer: the base is taken on trust. Its upload
                # drops the cycle if the point turns out gone, and the agent resyncs.
                pass
        old = {d["name"]: (d["size"], d["block_size"])
               for d in json.loads(base.begin_doc)["disks"]}
        new = {d["name"]: (d["size"], d["block_size"]) for d in doc["disks"]}
        return old == new

    async def begin(self, doc: dict[str, Any]) -> None:
        validate_begin(doc)
        await self.deps.trust.authorize_disks(self.machine,
                                                [d["name"] for d in doc["disks"]])
        if not await self._base_ok(doc):
            await self.send(error_frame(
                "resync_required", f"base cycle {doc.get('base')!r} is unknown here "
                "or the disk layout changed", "send a full cycle"))
            return
        resumable = "resume" in self.features
        async with self.deps.sessionmaker() as s:
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
        await self.deps.cycles.supersede(self.machine, cycle_seq)
        oc = OpenCycle(cycle_seq, doc["cycle"], self.machine, doc, resumable,
                       self.deps.cache_dir / self.machine / doc["cycle"])
        self.deps.cycles.open[oc.id] = oc
        async with oc.lock:
            await self.send(encode_json(FrameType.READY, {"cycle": doc["cycle"]}))
            self.deps.uploader.wake()
            await receive_cycle(self, oc)

    async def resume(self, doc: dict[str, Any]) -> None:
        cycle = doc.get("cycle")
        if not is_id(cycle):
            raise ProtocolError("bad_resume", "RESUME needs the 'cycle' id to continue")
        assert isinstance(cycle, str)
        oc = self.deps.cycles.open.get(cycle)
        if oc is not None and oc.machine == self.machine and oc.resumable:
            if oc.cut_session():  # one the agent gave up on (it cannot tell us)
                self.log.info("cycle_taken_over", cycle=cycle)
            async with oc.lock:
                if oc.state == OPEN and oc.suspended_at is not None and \
                        time.monotonic() - oc.suspended_at >= \
                        self.deps.settings.resume_window:
                    await self.deps.cycles.abort(oc, "resume window passed")
                if oc.state == OPEN:
                    oc.suspended_at = None
                    if oc.expiry is not None:
                        oc.expiry.cancel()
                        oc.expiry = None
                    await self.send(encode_json(FrameType.PROGRESS, {
                        "cycle": cycle, "blocks": oc.frames, "position": oc.position()}))
                    self.deps.metrics.resumed_cycles.inc()
                    self.log.info("cycle_resumed", cycle=cycle, blocks=oc.frames,
                                  position=oc.position())
                    oc.floor = oc.last
                    await receive_cycle(self, oc)
                    return
        async with self.deps.sessionmaker() as s:
            row = (await s.execute(select(db.Cycle).where(
                db.Cycle.id == cycle, db.Cycle.machine == self.machine))).scalar_one_or_none()
        if row is not None and row.state in (db.COMPLETE, db.UPLOADED):
            # Complete: the ACK was lost on the way. Acknowledge it again.
            await self.send(encode_json(FrameType.ACK, {"cycle": cycle}))
            return
        await self.send(error_frame(
            "cannot_resume", f"cycle {cycle} cannot be resumed here (unknown, aborted, or "
            "past its resume window)", "begin a new cycle"))
