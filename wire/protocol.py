"""The replication wire protocol on port 9443. Standard library only: agents import it.

Every frame is a 8-byte header and a payload::

    offset  size  field
    0       2     magic b"SR"
    2       1     protocol version (1)
    3       1     frame type (FrameType)
    4       4     u32 LE payload length (checked against the cap before any allocation)
    8       n     payload

Control frames carry UTF-8 JSON objects; BLOCK and ZERO frames are binary
(``u16 disk index | u64 block number | data``). A session is::

    agent: HELLO            server: WELCOME   (or ERROR)
    agent: BEGIN            server: READY     (or ERROR code=resync_required)
    agent: BLOCK|ZERO ...
    agent: SYNC             server: PROGRESS  (optional: everything so far is durable)
    agent: END              server: ACK       (only after the cycle is fsynced)

To continue a cycle whose connection broke, the agent sends ``RESUME`` instead of
``BEGIN``, answered by ``PROGRESS`` (continue after the position it names), ``ACK``
(the cycle was already complete) or ``ERROR code=cannot_resume``. HEARTBEAT frames
may come from either side at any point after WELCOME and are otherwise ignored.

Before a BEGIN, an agent that lost its fingerprint map (or whose base the server no
longer knows) may ask what the vault holds instead of resending every block::

    agent: BASIS {disks}    server: BASIS {cycle, point, disks}, then MAP ... per disk
                            (or ERROR code=no_basis: send a full cycle)

and then BEGIN a delta cycle on the named ``cycle``. MAP frames are binary
(``u16 disk index | u64 first block | 16-byte fingerprints``), in block order; the
server reads the point back and sends it range by range, so an ERROR may come after
some MAP frames of a disk (the map is then not to be used).

To write a recovery point back onto its disks (failback, a repair in place), an agent
that speaks ``restore`` names the point in BASIS and then fetches only the blocks its
disks hold differently::

    agent: BASIS {disks, point}   server: BASIS {cycle, point, disks}, MAP ... per disk
    agent: FETCH {point, disk, blocks: [n, ...]}
                                  server: BLOCK|ZERO per block, in that order, then
                                          FETCH {point, disk, blocks: count}
                                          (or ERROR code=no_point / bad_fetch)

The BASIS answer's ``disks`` then carry the point's own ``size`` and ``block_size``.

A member of a consistency group that speaks ``group`` joins a group point's barrier on a
connection of its own (``procserver/barrier.py``), twice: before it freezes, and once
frozen inside its cycle::

    agent: BARRIER {point, group, members, timeout_seconds, phase: "ready"}
                                  server: BARRIER {point, phase, released: true}
    agent: BARRIER {..., phase: "frozen", cycle, held}
                                  server: BARRIER {point, phase, released: true}
                                  (or ERROR code=group_point_failed, either time)

Frame types 10-17 are optional features of version 1: an agent lists the ones it
speaks in HELLO ``features`` (``heartbeat``, ``resume``, ``resync``, ``restore``,
``group``), the server
answers with the ones both speak in WELCOME ``features``, and neither side sends a
frame of a feature the other did not list. Peers that list nothing speak the original nine types.

The process server reads connections with ``procserver/framestream.py`` instead of
``read_frame``: the same frames, parsed in its receive buffers without a copy.
"""

from __future__ import annotations

import asyncio
import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"SR"
VERSION = 1
HEADER = struct.Struct("<2sBBI")
BLOCK_HEAD = struct.Struct("<HQ")
MAX_CONTROL = 64 * 1024
MAX_FRAME = (1 << 20) + BLOCK_HEAD.size
DEFAULT_PORT = 9443


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    BEGIN = 3
    READY = 4
    BLOCK = 5
    ZERO = 6
    END = 7
    ACK = 8
    ERROR = 9
    HEARTBEAT = 10  # feature "heartbeat": either side, "{}", ignored
    RESUME = 11  # feature "resume": agent -> server {"cycle"}
    SYNC = 12  # feature "resume": agent -> server {"cycle"}; answered by PROGRESS
    PROGRESS = 13  # feature "resume": server -> agent {"cycle", "blocks", "position"}
    BASIS = 14  # feature "resync": agent -> server {"disks"}; server -> agent its answer
    MAP = 15  # feature "resync": server -> agent, u16 disk | u64 first block | fingerprints
    FETCH = 16  # feature "restore": agent -> server {"point", "disk", "blocks"}; the end
    BARRIER = 17  # feature "group": agent -> server {"point", "phase", ...}; the release


CONTROL = {FrameType.HELLO, FrameType.WELCOME, FrameType.BEGIN, FrameType.READY,
           FrameType.END, FrameType.ACK, FrameType.ERROR, FrameType.HEARTBEAT,
           FrameType.RESUME, FrameType.SYNC, FrameType.PROGRESS, FrameType.BASIS,
           FrameType.FETCH, FrameType.BARRIER}
DATA = (FrameType.BLOCK, FrameType.ZERO)
FEATURES = ("heartbeat", "resume", "resync", "restore", "group")
MAX_FETCH = 2048  # block numbers in one FETCH
FINGERPRINT = 16  # bytes of one block fingerprint in a MAP frame
MAP_BLOCKS = (MAX_FRAME - BLOCK_HEAD.size) // FINGERPRINT  # fingerprints per MAP frame


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame here. Carries an error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RemoteError(Exception):
    """The peer answered with an ERROR frame."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"{message} ({code})" + (f"; {hint}" if hint else ""))
        self.code, self.message, self.hint = code, message, hint


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes | memoryview  # a view for frames read from an HRL segment (no copy)

    def json(self) -> dict[str, Any]:
        try:
            doc = json.loads(bytes(self.payload))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError("bad_json", f"{self.type.name} payload is not JSON") from None
        if not isinstance(doc, dict):
            raise ProtocolError("bad_json", f"{self.type.name} payload is not a JSON object")
        return doc

    def map(self) -> tuple[int, int, memoryview]:
        """``(disk index, first block, fingerprints)`` of a MAP frame."""
        disk, first, fps = self.block()
        if len(fps) % FINGERPRINT:
            raise ProtocolError("bad_map", "a MAP frame holds whole 16-byte fingerprints")
        return disk, first, fps

    def block(self) -> tuple[int, int, memoryview]:
        if len(self.payload) < BLOCK_HEAD.size:
            raise ProtocolError("bad_block", f"{self.type.name} frame is too short")
        disk, n = BLOCK_HEAD.unpack_from(self.payload, 0)
        return disk, n, memoryview(self.payload)[BLOCK_HEAD.size :]


def parse_header(head: bytes, max_frame: int = MAX_FRAME) -> tuple[FrameType, int]:
    """Validate an 8-byte header; return ``(type, payload length)`` or raise ProtocolError."""
    if len(head) != HEADER.size:
        raise ProtocolError("short_header", "frame header is truncated")
    magic, version, ftype, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError("bad_magic", "not a siterecovery replication stream (bad magic)")
    if version != VERSION:
        raise ProtocolError("bad_version",
                            f"protocol version {version}; this side speaks {VERSION}")
    try:
        t = FrameType(ftype)
    except ValueError:
        raise ProtocolError("bad_type", f"unknown frame type {ftype}") from None
    cap = MAX_CONTROL if t in CONTROL else max_frame
    if length > cap:
        raise ProtocolError("frame_too_large",
                            f"{t.name} frame of {length} bytes exceeds the {cap}-byte cap")
    return t, length


def decode(buf: bytes | memoryview, max_frame: int = MAX_FRAME) -> tuple[Frame, int]:
    """Decode one whole frame from the front of ``buf``; return it and bytes consumed."""
    t, length = parse_header(bytes(buf[: HEADER.size]), max_frame)
    end = HEADER.size + length
    if len(buf) < end:
        raise ProtocolError("truncated", f"{t.name} frame is truncated")
    return Frame(t, bytes(buf[HEADER.size : end])), end


def encode(t: FrameType, payload: bytes | memoryview = b"") -> bytes:
    return HEADER.pack(MAGIC, VERSION, t, len(payload)) + bytes(payload)


def encode_json(t: FrameType, doc: dict[str, Any]) -> bytes:
    return encode(t, json.dumps(doc, separators=(",", ":")).encode())


def block_frame_parts(
    t: FrameType, disk: int, n: int, data: bytes | memoryview = b""
) -> tuple[bytes, bytes | memoryview]:
    """Header+block header and the data, for ``writer.writelines`` without a copy."""
    head = HEADER.pack(MAGIC, VERSION, t, BLOCK_HEAD.size + len(data)) + BLOCK_HEAD.pack(disk, n)
    return head, data


async def read_frame(
    reader: asyncio.StreamReader, *, timeout: float, max_frame: int = MAX_FRAME
) -> Frame:
    """Read one frame, with a timeout and the size cap applied before allocation."""
    head = b""
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readexactly(HEADER.size)
            t, length = parse_header(head, max_frame)
            payload = await reader.readexactly(length) if length else b""
    except TimeoutError:
        raise ProtocolError("timeout", f"no complete frame within {timeout:g}s") from None
    except asyncio.IncompleteReadError as e:
        if not e.partial and not head:
            raise ConnectionResetError("peer closed the connection") from None
        raise ProtocolError("truncated", "connection closed in the middle of a frame") from None
    return Frame(t, payload)


def map_frames(disk: int, fps: bytes | memoryview, first: int = 0) -> list[bytes]:
    """The MAP frames of one disk's fingerprint map, or of the range of it that starts
    at block ``first`` (a map sent range by range)."""
    view = memoryview(fps)
    step = MAP_BLOCKS * FINGERPRINT
    return [encode(FrameType.MAP, BLOCK_HEAD.pack(disk, first + off // FINGERPRINT)
                   + view[off:off + step]) for off in range(0, len(view), step)]


def error_frame(code: str, message: str, hint: str = "") -> bytes:
    return encode_json(FrameType.ERROR, {"code": code, "message": message, "hint": hint})


def raise_if_error(frame: Frame) -> None:
    if frame.type == FrameType.ERROR:
        doc = frame.json()
        raise RemoteError(str(doc.get("code", "error")), str(doc.get("message", "")),
                          str(doc.get("hint", "")))


HEARTBEAT_FRAME = HEADER.pack(MAGIC, VERSION, FrameType.HEARTBEAT, 2) + b"{}"


def features_of(doc: dict[str, Any]) -> frozenset[str]:
    """The known optional features a HELLO or WELCOME lists (unknown names are ignored)."""
    listed = doc.get("features")
    if not isinstance(listed, list):
        return frozenset()
    return frozenset(f for f in listed if isinstance(f, str) and f in FEATURES)
