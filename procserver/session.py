"""One agent session on port 9443: validate, cache durably, acknowledge."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select

from procserver import db
from procserver.cache import SegmentWriter, remove_cycle_dir
from procserver.wire import (
    HEADER,
    MAGIC,
    VERSION,
    Frame,
    FrameType,
    ProtocolError,
    encode_json,
    error_frame,
    read_frame,
)

if TYPE_CHECKING:
    from procserver.server import ProcServer

log = structlog.get_logger("procserver.session")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_DISK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONSISTENCY = ("app", "crash", "inconsistent")
MAX_DISKS = 64
MAX_DISK_BYTES = 64 << 40
HANDSHAKE_TIMEOUT = 15.0


def _is_id(v: object) -> bool:
    return isinstance(v, str) and _ID.fullmatch(v) is not None


def _validate_begin(doc: dict[str, Any]) -> None:
    cyc, disks = doc.get("cycle"), doc.get("disks")
    if not _is_id(cyc):
        raise ProtocolError("bad_begin", "BEGIN needs a 'cycle' id of [a-z0-9-], max 64")
    if not isinstance(doc.get("full"), bool):
        raise ProtocolError("bad_begin", "BEGIN needs a boolean 'full'")
    base = doc.get("base")
    if not doc["full"] and not _is_id(base):
        raise ProtocolError("bad_begin", "a delta cycle needs the 'base' cycle it builds on")
    if doc["full"] and base is not None and not _is_id(base):
        raise ProtocolError("bad_begin", "'base' must be null or a cycle id")
    if doc.get("consistency") not in CONSISTENCY:
        raise ProtocolError("bad_begin", f"'consistency' must be one of {CONSISTENCY}")
    if not isinstance(disks, list) or not 1 <= len(disks) <= MAX_DISKS:
        raise ProtocolError("bad_begin", f"BEGIN needs 1-{MAX_DISKS} disks")
    names = set()
    for d in disks:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) \
                or not _DISK.fullmatch(d["name"]):
            raise ProtocolError("bad_begin", "each disk needs a 'name' of [A-Za-z0-9_.-]")
        size, bs = d.get("size"), d.get("block_size")
        if not isinstance(size, int) or not 0 < size <= MAX_DISK_BYTES:
            raise ProtocolError("bad_begin", f"disk {d['name']!r} has an invalid size")
        if not isinstance(bs, int) or bs & (bs - 1) or not (1 << 16) <= bs <= (1 << 20):
            raise ProtocolError("bad_begin",
                                f"disk {d['name']!r}: block_size must be a power of two, 64K-1M")
        names.add(d["name"])
    if len(names) != len(disks):
        raise ProtocolError("bad_begin", "disk names must be unique")


_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")


def _validate_end(end: dict[str, Any], cycle: str, disks: list[dict[str, Any]],
                  received: int) -> None:
    if end.get("blocks") != received:
        raise ProtocolError("bad_end", f"END counts {end.get('blocks')!r} blocks; "
                                       f"{received} arrived in this cycle")
    digests = end.get("digests")
    if end.get("cycle") != cycle or not isinstance(digests, dict) or \
            set(digests) != {d["name"] for d in disks}:
        raise ProtocolError("bad_end", "END must name the cycle and a digest for every disk")
    if not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in digests.values()):
        raise ProtocolError("bad_end", "each disk digest must be 64 lowercase hex characters")
    created = end.get("created")
    if not isinstance(created, str) or not _TIME.fullmatch(created):
        raise ProtocolError("bad_end", "'created' must be a UTC time like "
                                       "2026-01-31T12:00:00.000000Z")


class Session:
    def __init__(self, server: ProcServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, machine: str) -> None:
        self.server, self.reader, self.writer, self.machine = server, reader, writer, machine
        self.log = log.bind(machine=machine, peer=str(writer.get_extra_info("peername")))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def run(self) -> None:
        timeout = self.server.cfg.idle_timeout_seconds
        hello = await read_frame(self.reader, timeout=min(HANDSHAKE_TIMEOUT, timeout))
        if hello.type != FrameType.HELLO:
            raise ProtocolError("expected_hello", f"expected HELLO, got {hello.type.name}")
        claimed = hello.json().get("machine")
        if claimed != self.machine:
            raise ProtocolError(
                "wrong_machine",
                f"the client certificate is for machine {self.machine!r}, "
                f"not {claimed!r}: a machine may write only its own disks")
        await self.send(encode_json(FrameType.WELCOME, {"server": "siterecovery-procserver",
                                                        "max_frame": self.server.max_frame}))
        self.log.info("session_started")
        while True:
            try:
                frame = await read_frame(self.reader, timeout=timeout)
            except ConnectionResetError:
                return
            if frame.type != FrameType.BEGIN:
                raise ProtocolError("expected_begin", f"expected BEGIN, got {frame.type.name}")
            await self.cycle(frame.json())

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

    async def cycle(self, doc: dict[str, Any]) -> None:
        _validate_begin(doc)
        if not await self._base_ok(doc):
            await self.send(error_frame(
                "resync_required", f"base cycle {doc.get('base')!r} is unknown here "
                "or the disk layout changed", "send a full cycle"))
            return
        disks = doc["disks"]
        limits = [((d["size"] + d["block_size"] - 1) // d["block_size"], d["block_size"],
                   d["size"]) for d in disks]
        # One bit per block and disk: a block may arrive once per cycle (bounded memory:
        # 1 bit per 64 KiB is 4 MiB for a 2 TiB disk).
        seen = [bytearray((n + 7) // 8) for n, _bs, _size in limits]
        received = 0
        cycle_dir = self.server.cache_dir / self.machine / doc["cycle"]
        async with self.server.sessionmaker() as s:
            exists = (await s.execute(select(db.Cycle).where(db.Cycle.id == doc["cycle"]))
                      ).scalar_one_or_none()
            if exists is not None:
                raise ProtocolError("duplicate_cycle", f"cycle {doc['cycle']} was already sent")
            row = db.Cycle(id=doc["cycle"], machine=self.machine, state=db.RECEIVING,
                           full=doc["full"], base=doc.get("base"), begin_doc=json.dumps(doc),
                           created=time.time())
            s.add(row)
            await s.commit()
            cycle_seq = row.seq
        await self.send(encode_json(FrameType.READY, {"cycle": doc["cycle"]}))
        self.server.uploader.wake()
        seg_no = 0
        seg = await self._new_segment(cycle_seq, cycle_dir, seg_no)
        timeout = self.server.cfg.idle_timeout_seconds
        complete = False
        try:
            while True:
                frame = await read_frame(self.reader, timeout=timeout,
                                         max_frame=self.server.max_frame)
                if frame.type in (FrameType.BLOCK, FrameType.ZERO):
                    d, n, data = frame.block()
                    if d >= len(limits) or n >= limits[d][0]:
                        raise ProtocolError("bad_block", f"block {d}:{n} lies outside the disks")
                    _nblocks, bs, size = limits[d]
                    want = min(bs, size - n * bs) if frame.type == FrameType.BLOCK else 0
                    if len(data) != want:
                        raise ProtocolError("bad_block",
                                            f"block {d}:{n} has {len(data)} bytes, not {want}")
                    if seen[d][n >> 3] & (1 << (n & 7)):
                        raise ProtocolError("bad_block", f"block {d}:{n} was sent twice")
                    seen[d][n >> 3] |= 1 << (n & 7)
                    received += 1
                    await self.server.reserve_cache(cycle_seq, len(frame.payload) + HEADER.size)
                    seg.append(frame_head(frame), frame.payload)
                    self.server.metrics.received_bytes.inc(len(data))
                    if seg.size >= self.server.cfg.segment_bytes:
                        await self._seal(seg, cycle_seq, seg_no)
                        seg_no += 1
                        seg = await self._new_segment(cycle_seq, cycle_dir, seg_no)
                elif frame.type == FrameType.END:
                    end = frame.json()
                    _validate_end(end, doc["cycle"], disks, received)
                    await self._seal(seg, cycle_seq, seg_no)
                    async with self.server.sessionmaker() as s:
                        row = await s.get_one(db.Cycle, cycle_seq)
                        row.state, row.end_doc = db.COMPLETE, json.dumps(end)
                        await s.commit()
                    # From here the cycle is durable and will become a point, whether or
                    # not the ACK reaches the agent: it must never be aborted.
                    complete = True
                    self.server.uploader.wake()
                    await self.send(encode_json(FrameType.ACK, {"cycle": doc["cycle"]}))
                    self.log.info("cycle_acknowledged", cycle=doc["cycle"], segments=seg_no + 1)
                    return
                else:
                    raise ProtocolError("unexpected_frame",
                                        f"{frame.type.name} is not valid inside a cycle")
        except BaseException:
            if not complete:
                seg.discard()
                await self._abort(cycle_seq, cycle_dir)
            raise

    async def _new_segment(self, cycle_seq: int, cycle_dir: Path, seg_no: int) -> SegmentWriter:
        seg = await asyncio.to_thread(SegmentWriter, cycle_dir / f"{seg_no:08d}.hrl")
        await self.server.reserve_cache(cycle_seq, seg.size)
        return seg

    async def _seal(self, seg: SegmentWriter, cycle_seq: int, seg_no: int) -> None:
        await asyncio.to_thread(seg.seal)
        async with self.server.sessionmaker() as s:
            s.add(db.Segment(cycle_seq=cycle_seq, seq=seg_no, path=str(seg.path), size=seg.size))
            await s.commit()
        self.server.uploader.wake()

    async def _abort(self, cycle_seq: int, cycle_dir: Path) -> None:
        async with self.server.sessionmaker() as s:
            row = await s.get_one(db.Cycle, cycle_seq)
            row.state = db.ABORTED
            await s.commit()
        await asyncio.to_thread(remove_cycle_dir, cycle_dir)
        self.server.release_cache(cycle_seq)
        self.server.uploader.wake()
        self.log.warning("cycle_aborted", cycle_seq=cycle_seq)


def frame_head(frame: Frame) -> bytes:
    return HEADER.pack(MAGIC, VERSION, frame.type, len(frame.payload))

