"""Unit tests of the replication frame codec (procserver/wire.py) — invariants 7 and 8.

Every byte string is either a valid frame or a ProtocolError, never another
exception; a declared length above the cap is refused from the header alone,
before any payload is read or allocated; every read has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procserver.cache import SEGMENT_MAGIC, read_segment
from procserver.framestream import FrameStream
from wire.protocol import (
    BLOCK_HEAD,
    CONTROL,
    FEATURES,
    HEADER,
    HEARTBEAT_FRAME,
    MAGIC,
    MAP_BLOCKS,
    MAX_CONTROL,
    MAX_FRAME,
    VERSION,
    Frame,
    FrameType,
    ProtocolError,
    RemoteError,
    block_frame_parts,
    decode,
    encode,
    encode_json,
    error_frame,
    features_of,
    map_frames,
    parse_header,
    raise_if_error,
    read_frame,
)

T = TypeVar("T")
DATA_TYPES = (FrameType.BLOCK, FrameType.ZERO, FrameType.MAP)  # binary payloads
CONTROL_DOCS: dict[FrameType, dict[str, object]] = {
    FrameType.HELLO: {"machine": "web01", "agent_version": "0.1.0"},
    FrameType.WELCOME: {"server": "siterecovery-procserver", "max_frame": MAX_FRAME},
    FrameType.BEGIN: {"cycle": "c1", "full": True, "consistency": "crash", "base": None,
                      "disks": [{"name": "sda", "size": 1 << 20, "block_size": 1 << 16}]},
    FrameType.READY: {"cycle": "c1"},
    FrameType.END: {"cycle": "c1", "digests": {"sda": "ab" * 32}, "created": "x"},
    FrameType.ACK: {"cycle": "c1"},
    FrameType.ERROR: {"code": "bad_block", "message": "no", "hint": "send less"},
    FrameType.HEARTBEAT: {},
    FrameType.RESUME: {"cycle": "c1"},
    FrameType.SYNC: {"cycle": "c1"},
    FrameType.PROGRESS: {"cycle": "c1", "blocks": 7, "position": [0, 12]},
    FrameType.BASIS: {"cycle": "c0", "point": "ab" * 32, "disks": [{"name": "sda",
                                                                    "blocks": 16}]},
    FrameType.FETCH: {"point": "ab" * 32, "disk": "sda", "blocks": [3, 9]},
    FrameType.BARRIER: {"point": "ab" * 16, "group": "erp", "members": ["web01", "db01"],
                        "timeout_seconds": 30, "phase": "ready"},
}


def head(t: int, length: int, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, t, length)


def cap_of(t: FrameType, max_frame: int = MAX_FRAME) -> int:
    return MAX_CONTROL if t in CONTROL else max_frame


def run(make: Callable[[], Awaitable[T]]) -> T:
    """Run one coroutine on a fresh loop (for the synchronous hypothesis properties)."""

    async def main() -> T:
        return await make()

    return asyncio.run(main())


async def fed(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    if data:
        reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def code_of(exc: pytest.ExceptionInfo[ProtocolError]) -> str:
    return exc.value.code


# -- round trips ------------------------------------------------------------------------------

def test_every_frame_type_is_covered() -> None:
    assert set(CONTROL_DOCS) | set(DATA_TYPES) == set(FrameType)
    assert set(CONTROL) == set(CONTROL_DOCS)


@pytest.mark.parametrize("t", sorted(CONTROL_DOCS), ids=lambda t: t.name)
def test_control_frames_round_trip(t: FrameType) -> None:
    doc = CONTROL_DOCS[t]
    raw = encode_json(t, doc)
    assert raw[:2] == MAGIC and raw[2] == VERSION and raw[3] == t
    frame, used = decode(raw + b"trailing bytes of the next frame")
    assert used == len(raw)
    assert frame.type == t
    assert frame.json() == doc
    assert encode(frame.type, frame.payload) == raw


@pytest.mark.parametrize("t", DATA_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 256], ids=["0", "1", "64K"])
def test_block_frames_round_trip(t: FrameType, data: bytes) -> None:
    h, body = block_frame_parts(t, 3, (1 << 40) + 5, data)
    raw = h + bytes(body)
    assert raw == encode(t, BLOCK_HEAD.pack(3, (1 << 40) + 5) + data)
    frame, used = decode(raw)
    assert used == len(raw)
    assert frame.type == t
    disk, n, got = frame.block()
    assert (disk, n, bytes(got)) == (3, (1 << 40) + 5, data)


@pytest.mark.parametrize("blocks", [0, 1, MAP_BLOCKS - 1, MAP_BLOCKS, MAP_BLOCKS + 1,
                                    3 * MAP_BLOCKS + 7])
def test_map_frames_carry_a_whole_map_in_capped_frames(blocks: int) -> None:
    fps = bytes(random.Random(blocks).randbytes(16 * blocks))
    raws = map_frames(5, fps)
    assert len(raws) == -(-blocks // MAP_BLOCKS)
    got = bytearray()
    for raw in raws:
        frame, used = decode(raw)  # the default cap: the largest frame fits
        assert used == len(raw) and frame.type == FrameType.MAP
        disk, first, part = frame.map()
        assert disk == 5 and first == len(got) // 16
        got += part
    assert bytes(got) == fps


@pytest.mark.parametrize("extra", [1, 15])
def test_map_frame_with_a_partial_fingerprint_is_refused(extra: int) -> None:
    frame = Frame(FrameType.MAP, BLOCK_HEAD.pack(0, 0) + bytes(32 + extra))
    with pytest.raises(ProtocolError) as e:
        frame.map()
    assert code_of(e) == "bad_map"


async def test_read_frame_reads_a_stream_of_every_type() -> None:
    frames = [Frame(t, json.dumps(doc).encode()) for t, doc in CONTROL_DOCS.items()]
    frames += [Frame(t, BLOCK_HEAD.pack(0, 7) + (b"d" * 100 if t == FrameType.BLOCK else b""))
               for t in DATA_TYPES]
    reader = await fed(b"".join(encode(f.type, f.payload) for f in frames))
    got = [await read_frame(reader, timeout=5) for _ in frames]
    assert got == frames
    with pytest.raises(ConnectionResetError):  # clean end of stream at a frame boundary
        await read_frame(reader, timeout=5)


def test_block_frame_the_largest_block_fits_the_cap() -> None:
    raw = encode(FrameType.BLOCK, BLOCK_HEAD.pack(0, 0) + bytes(1 << 20))
    frame, _ = decode(raw)
    assert len(frame.payload) == MAX_FRAME


def test_error_frame_and_raise_if_error() -> None:
    frame, _ = decode(error_frame("resync_required", "base unknown", "send a full cycle"))
    assert frame.type == FrameType.ERROR
    with pytest.raises(RemoteError) as e:
        raise_if_error(frame)
    assert (e.value.code, e.value.message, e.value.hint) == (
        "resync_required", "base unknown", "send a full cycle")
    assert "resync_required" in str(e.value) and "send a full cycle" in str(e.value)
    raise_if_error(Frame(FrameType.ACK, b"{}"))  # anything but ERROR passes


# -- payload accessors ---------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"not json", b"\xff\xfe{}", b"[1,2]", b"42", b'"s"',
                                     b"null", b'{"a":'], ids=repr)
def test_json_refuses_what_is_not_a_json_object(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as e:
        Frame(FrameType.HELLO, payload).json()
    assert code_of(e) == "bad_json"
    assert "HELLO" in str(e.value)


@pytest.mark.parametrize("payload", [b"[" * 60000, b'{"a":' * 12000])
def test_json_refuses_deeply_nested_payload(payload: bytes) -> None:
    assert len(payload) <= MAX_CONTROL
    with pytest.raises(ProtocolError) as e:
        Frame(FrameType.HELLO, payload).json()
    assert code_of(e) == "bad_json"


@pytest.mark.parametrize("size", range(BLOCK_HEAD.size))
def test_block_refuses_short_payload(size: int) -> None:
    with pytest.raises(ProtocolError) as e:
        Frame(FrameType.BLOCK, bytes(size)).block()
    assert code_of(e) == "bad_block"


# -- header validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 7, 9, 16])
def test_parse_header_refuses_wrong_header_size(n: int) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_header((head(FrameType.HELLO, 0) * 2)[:n])
    assert code_of(e) == "short_header"


@pytest.mark.parametrize("magic", [b"\x00\x00", b"sr", b"RS", b"\x16\x03", b"GE"])
def test_parse_header_refuses_bad_magic(magic: bytes) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_header(head(FrameType.HELLO, 2, magic=magic))
    assert code_of(e) == "bad_magic"
    assert "magic" in str(e.value)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_parse_header_refuses_other_versions(version: int) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_header(head(FrameType.HELLO, 2, version=version))
    assert code_of(e) == "bad_version"
    assert str(version) in str(e.value)


@pytest.mark.parametrize("t", [0, max(FrameType) + 1, max(FrameType) + 2, 128, 255])
def test_parse_header_refuses_unknown_types(t: int) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_header(head(t, 0))
    assert code_of(e) == "bad_type"
    assert str(t) in str(e.value)


@pytest.mark.parametrize("t", sorted(CONTROL), ids=lambda t: t.name)
def test_control_frames_are_capped_at_max_control(t: FrameType) -> None:
    assert parse_header(head(t, MAX_CONTROL)) == (t, MAX_CONTROL)
    for length in (MAX_CONTROL + 1, MAX_FRAME, 0xFFFFFFFF):
        with pytest.raises(ProtocolError) as e:
            parse_header(head(t, length))
        assert code_of(e) == "frame_too_large"
        assert str(MAX_CONTROL) in str(e.value)


@pytest.mark.parametrize("t", DATA_TYPES, ids=lambda t: t.name)
def test_data_frames_are_capped_at_max_frame(t: FrameType) -> None:
    assert parse_header(head(t, MAX_FRAME)) == (t, MAX_FRAME)
    for length in (MAX_FRAME + 1, 0xFFFFFFFF):
        with pytest.raises(ProtocolError) as e:
            parse_header(head(t, length))
        assert code_of(e) == "frame_too_large"
    # A smaller negotiated cap applies to data frames only.
    assert parse_header(head(t, 100), max_frame=100) == (t, 100)
    with pytest.raises(ProtocolError) as e:
        parse_header(head(t, 101), max_frame=100)
    assert code_of(e) == "frame_too_large"
    assert parse_header(head(FrameType.END, 1000), max_frame=100) == (FrameType.END, 1000)


def test_decode_refuses_oversized_length_without_the_payload() -> None:
    """The cap is applied from the header alone: no payload is needed to refuse."""
    with pytest.raises(ProtocolError) as e:
        decode(head(FrameType.BLOCK, 0xFFFFFFFF))
    assert code_of(e) == "frame_too_large"


@pytest.mark.parametrize("missing", [1, 5, 100])
def test_decode_refuses_truncated_payload(missing: int) -> None:
    raw = encode(FrameType.BLOCK, BLOCK_HEAD.pack(0, 0) + bytes(100))
    with pytest.raises(ProtocolError) as e:
        decode(raw[:-missing])
    assert code_of(e) == "truncated"


# -- properties on arbitrary bytes ----------------------------------------------------------------

lengths = st.one_of(st.integers(0, 64), st.sampled_from(
    [MAX_CONTROL - 1, MAX_CONTROL, MAX_CONTROL + 1, MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1,
     0x7FFFFFFF, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))
near_headers = st.builds(
    HEADER.pack,
    st.one_of(st.just(MAGIC), st.binary(min_size=2, max_size=2)),
    st.one_of(st.just(VERSION), st.integers(0, 255)),
    st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 255)),
    lengths,
)
# Arbitrary bytes, and headers that are almost right followed by arbitrary bytes.
streams = st.one_of(st.binary(max_size=256),
                    st.builds(lambda h, rest: h + rest, near_headers, st.binary(max_size=128)))


def check_valid(frame: Frame, used: int, buf: bytes, max_frame: int) -> None:
    assert isinstance(frame.type, FrameType)
    assert len(frame.payload) <= cap_of(frame.type, max_frame)
    assert used == HEADER.size + len(frame.payload) <= len(buf)
    assert encode(frame.type, frame.payload) == buf[:used]


@given(st.one_of(st.binary(max_size=16), near_headers))
def test_parse_header_returns_a_capped_frame_or_protocol_error(head_bytes: bytes) -> None:
    try:
        t, length = parse_header(head_bytes)
    except ProtocolError as e:
        assert e.code in {"short_header", "bad_magic", "bad_version", "bad_type",
                          "frame_too_large"}
        return
    assert isinstance(t, FrameType)
    assert length <= cap_of(t)
    assert head_bytes == HEADER.pack(MAGIC, VERSION, t, length)


@given(streams, st.sampled_from([MAX_FRAME, 64, 0]))
def test_decode_returns_a_valid_frame_or_protocol_error(buf: bytes, max_frame: int) -> None:
    try:
        frame, used = decode(buf, max_frame)
    except ProtocolError as e:
        assert e.code in {"short_header", "bad_magic", "bad_version", "bad_type",
                          "frame_too_large", "truncated"}
        return
    check_valid(frame, used, buf, max_frame)


@given(st.binary(max_size=512))
def test_frame_accessors_raise_only_protocol_errors(payload: bytes) -> None:
    try:
        doc = Frame(FrameType.END, payload).json()
    except ProtocolError as e:
        assert e.code == "bad_json"
    else:
        assert isinstance(doc, dict)
    try:
        _disk, _n, data = Frame(FrameType.BLOCK, payload).block()
    except ProtocolError as e:
        assert e.code == "bad_block"
    else:
        assert len(data) == len(payload) - BLOCK_HEAD.size


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(streams)
def test_read_frame_returns_a_valid_frame_or_protocol_error(buf: bytes) -> None:
    """On a stream, the only other outcome is a clean close before any byte of a frame."""

    async def attempt() -> tuple[Frame | None, Exception | None, bytes]:
        reader = await fed(buf)
        try:
            frame: Frame | None = await read_frame(reader, timeout=5)
            err: Exception | None = None
        except (ProtocolError, ConnectionResetError) as e:
            frame, err = None, e
        return frame, err, await reader.read()

    frame, err, rest = run(attempt)
    if frame is not None:
        check_valid(frame, len(buf) - len(rest), buf, MAX_FRAME)
        return
    if isinstance(err, ConnectionResetError):
        # Only a close before the first byte of a frame is a clean close.
        assert buf == b""
        return
    assert isinstance(err, ProtocolError)
    assert err.code in {"bad_magic", "bad_version", "bad_type", "frame_too_large", "truncated"}
    if err.code != "truncated":
        # Refused from the header alone: not one payload byte was consumed.
        assert rest == buf[HEADER.size:]


# -- read_frame: caps before allocation, timeouts, truncation ---------------------------------

@pytest.mark.parametrize(("t", "length"), [(FrameType.BLOCK, MAX_FRAME + 1),
                                           (FrameType.ZERO, 0xFFFFFFFF),
                                           (FrameType.HELLO, MAX_CONTROL + 1),
                                           (FrameType.END, 0xFFFFFFFF)],
                         ids=["block", "zero", "hello", "end"])
async def test_read_frame_refuses_oversized_header_before_reading_payload(
        t: FrameType, length: int) -> None:
    """Only the header is available and the stream stays open: waiting for the payload would
    end in a timeout, so a frame_too_large proves the refusal came from the header alone."""
    reader = await fed(head(t, length) + b"first payload bytes", eof=False)
    with pytest.raises(ProtocolError) as e:
        await read_frame(reader, timeout=5)
    assert code_of(e) == "frame_too_large"
    assert await reader.readexactly(19) == b"first payload bytes"  # left unread


async def test_read_frame_applies_the_callers_cap() -> None:
    reader = await fed(encode(FrameType.BLOCK, bytes(200)), eof=False)
    with pytest.raises(ProtocolError) as e:
        await read_frame(reader, timeout=5, max_frame=100)
    assert code_of(e) == "frame_too_large"


async def test_read_frame_times_out_when_nothing_arrives() -> None:
    reader = await fed(b"", eof=False)
    with pytest.raises(ProtocolError) as e:
        await read_frame(reader, timeout=0.01)
    assert code_of(e) == "timeout"
    assert "0.01" in str(e.value)


@pytest.mark.parametrize("sent", [head(FrameType.HELLO, 10)[:5], head(FrameType.HELLO, 10),
                                  head(FrameType.HELLO, 10) + b"{}"],
                         ids=["half-header", "header-only", "partial-payload"])
async def test_read_frame_times_out_on_a_stalled_frame(sent: bytes) -> None:
    reader = await fed(sent, eof=False)
    with pytest.raises(ProtocolError) as e:
        await read_frame(reader, timeout=0.01)
    assert code_of(e) == "timeout"


@pytest.mark.parametrize("sent", [
    head(FrameType.HELLO, 10)[:5],
    head(FrameType.HELLO, 10),
    encode(FrameType.BLOCK, bytes(1000))[:-1],
], ids=["half-header", "header-only", "partial-payload"])
async def test_read_frame_reports_truncation(sent: bytes) -> None:
    reader = await fed(sent)
    with pytest.raises(ProtocolError) as e:
        await read_frame(reader, timeout=5)
    assert code_of(e) == "truncated"


async def test_read_frame_clean_close_is_a_connection_reset() -> None:
    with pytest.raises(ConnectionResetError):
        await read_frame(await fed(b""), timeout=5)


@pytest.mark.parametrize(("raw", "code"), [
    (b"GET / HTTP/1.1\r\n\r\n", "bad_magic"),
    (head(FrameType.HELLO, 0, version=9), "bad_version"),
    (head(77, 0), "bad_type"),
])
async def test_read_frame_refuses_bad_headers(raw: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as e:
        await read_frame(await fed(raw, eof=False), timeout=5)
    assert code_of(e) == code


# -- optional features: heartbeat and resume ---------------------------------------------------

def test_heartbeat_frame_is_a_control_frame_with_an_empty_object() -> None:
    frame, used = decode(HEARTBEAT_FRAME)
    assert used == len(HEARTBEAT_FRAME)
    assert (frame.type, frame.json()) == (FrameType.HEARTBEAT, {})


@pytest.mark.parametrize(("doc", "want"), [
    ({}, set()),
    ({"features": "heartbeat"}, set()),
    ({"features": ["heartbeat", 7, "teleport", "resume"]}, {"heartbeat", "resume"}),
    ({"features": list(FEATURES)}, set(FEATURES)),
])
def test_features_of_keeps_only_known_names(doc: dict[str, object], want: set[str]) -> None:
    assert features_of(doc) == want


# -- FrameStream: frames parsed in the receive buffers, over a real socket ---------------------

@contextlib.asynccontextmanager
async def stream_pair(**kw: int) -> AsyncIterator[tuple[FrameStream, socket.socket]]:
    """A FrameStream on one end of a real socket pair; the other end for the test to write."""
    a, b = socket.socketpair()
    a.setblocking(False)
    stream = FrameStream(**kw)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: stream, a)
    try:
        yield stream, b
    finally:
        transport.close()
        b.close()
        await stream.wait_closed()


async def send_all(sock: socket.socket, data: bytes, pieces: int = 1, seed: int = 0) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), min(pieces - 1, len(data) - 1))) \
        if len(data) > 1 else []
    sock.setblocking(False)
    for lo, hi in zip([0, *cuts], [*cuts, len(data)], strict=True):
        await loop.sock_sendall(sock, data[lo:hi])


def sample_frames(n: int, seed: int) -> list[Frame]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.6:
            out.append(Frame(FrameType.BLOCK, BLOCK_HEAD.pack(0, i) + rng.randbytes(
                rng.choice([1, 100, 4096, 65536, 70000]))))
        elif kind < 0.8:
            out.append(Frame(FrameType.ZERO, BLOCK_HEAD.pack(1, i)))
        else:
            t = rng.choice(sorted(CONTROL_DOCS))
            out.append(Frame(t, json.dumps(CONTROL_DOCS[t]).encode()))
    return out


@pytest.mark.parametrize("pieces", [1, 7, 300])
@pytest.mark.parametrize("chunk", [4096, 1 << 20])
async def test_frame_stream_yields_every_frame_whatever_the_split(pieces: int,
                                                                  chunk: int) -> None:
    """Small chunks make frames straddle buffers; random cuts make reads end mid-frame."""
    frames = sample_frames(60, seed=pieces * chunk)
    raw = b"".join(encode(f.type, f.payload) for f in frames)
    async with stream_pair(chunk=chunk, high_water=1 << 30) as (stream, peer):
        writer = asyncio.create_task(send_all(peer, raw, pieces, seed=pieces))
        got = [(await stream.next_frame(5)).frame() for _ in frames]
        await writer
    assert got == frames


async def test_frame_stream_frames_are_views_of_the_receive_buffer() -> None:
    """Frames that arrived together lie back to back in one buffer: a run is one slice."""
    frames = [encode(FrameType.BLOCK, BLOCK_HEAD.pack(0, n) + bytes([n]) * 1000)
              for n in range(5)]
    async with stream_pair() as (stream, peer):
        await send_all(peer, b"".join(frames))
        got = [await stream.next_frame(5) for _ in frames]
    assert all(g.buf is got[0].buf for g in got)
    assert [g.start for g in got[1:]] == [g.end for g in got[:-1]]
    assert bytes(got[0].buf[got[0].start:got[-1].end]) == b"".join(frames)
    assert [g.block_head() for g in got] == [(0, n) for n in range(5)]


async def test_frame_stream_pop_takes_only_whole_frames() -> None:
    raw = encode(FrameType.BLOCK, BLOCK_HEAD.pack(0, 1) + bytes(5000))
    async with stream_pair() as (stream, peer):
        await send_all(peer, raw[:3000])
        with pytest.raises(ProtocolError) as e:
            await stream.next_frame(0.05)  # not whole within the time: a timeout
        assert code_of(e) == "timeout"
        assert stream.pop() is None
        await send_all(peer, raw[3000:])
        assert (await stream.next_frame(5)).frame() == decode(raw)[0]
        assert stream.pop() is None


async def test_frame_stream_a_trickle_does_not_extend_the_deadline() -> None:
    """Bytes that keep coming, too slowly to make a frame: still a timeout (slow loris)."""
    raw = encode(FrameType.BLOCK, BLOCK_HEAD.pack(0, 1) + bytes(5000))
    async with stream_pair() as (stream, peer):

        async def trickle() -> None:
            for i in range(len(raw) - 1):
                await send_all(peer, raw[i:i + 1])
                await asyncio.sleep(0.01)  # the behaviour under test: a slow sender

        sender = asyncio.create_task(trickle())
        try:
            with pytest.raises(ProtocolError) as e:
                await stream.next_frame(0.3)
            assert code_of(e) == "timeout"
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender


@pytest.mark.parametrize(("sent", "exc", "code"), [
    (b"", ConnectionResetError, None),
    (encode(FrameType.BLOCK, bytes(100))[:50], ProtocolError, "truncated"),
    (head(FrameType.HELLO, 10)[:5], ProtocolError, "truncated"),
], ids=["clean-close", "mid-payload", "mid-header"])
async def test_frame_stream_end_of_stream(sent: bytes, exc: type[Exception],
                                          code: str | None) -> None:
    async with stream_pair() as (stream, peer):
        if sent:
            await send_all(peer, sent)
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(exc) as e:
            await stream.next_frame(5)
    if code is not None:
        assert isinstance(e.value, ProtocolError) and e.value.code == code


@pytest.mark.parametrize(("raw", "code"), [
    (head(FrameType.BLOCK, MAX_FRAME + 1), "frame_too_large"),
    (head(FrameType.HEARTBEAT, MAX_CONTROL + 1), "frame_too_large"),
    (b"GET / HTTP/1.1\r\n\r\n", "bad_magic"),
    (head(FrameType.HELLO, 0, version=2), "bad_version"),
    (head(99, 0), "bad_type"),
])
async def test_frame_stream_refuses_bad_headers_before_the_payload(raw: bytes,
                                                                   code: str) -> None:
    async with stream_pair() as (stream, peer):
        await send_all(peer, raw)
        with pytest.raises(ProtocolError) as e:
            await stream.next_frame(5)
    assert code_of(e) == code


async def test_frame_stream_applies_its_cap_to_data_frames() -> None:
    async with stream_pair(max_frame=100) as (stream, peer):
        await send_all(peer, encode(FrameType.BLOCK, bytes(101)))
        with pytest.raises(ProtocolError) as e:
            await stream.next_frame(5)
    assert code_of(e) == "frame_too_large"


async def test_frame_stream_stops_reading_at_its_high_water_mark() -> None:
    """A peer that sends faster than frames are taken: the stream holds at most about
    ``high_water`` bytes (plus one read), the rest waits in the kernel, then all arrives."""
    high = 256 << 10
    frames = [encode(FrameType.BLOCK, BLOCK_HEAD.pack(0, n) + bytes(60000)) for n in range(200)]
    raw = b"".join(frames)
    async with stream_pair(chunk=64 << 10, high_water=high, max_frame=64 << 10) as (
            stream, peer):
        assert stream.high_water == high
        writer = asyncio.create_task(send_all(peer, raw))
        peak = 0
        got = 0
        while got < len(frames):
            # Let the transport deliver whatever it will before anything is taken.
            for _ in range(20):
                await asyncio.sleep(0)
            peak = max(peak, stream.buffered)
            f = await stream.next_frame(5)
            assert f.block_head() == (0, got)
            got += 1
        await writer
    assert peak <= high + (256 << 10)  # one read past the mark at most
    assert peak < len(raw) // 4


# -- HRL segments read back (procserver/cache.py) ------------------------------------------------

@pytest.mark.parametrize("chunk", [7, 1000, 65536 + 5, 4 << 20])
def test_hrl_segment_frames_read_back_whatever_the_read_size(tmp_path: Path,
                                                             chunk: int) -> None:
    frames = [f for f in sample_frames(120, seed=chunk) if f.type in DATA_TYPES]
    path = tmp_path / "00000000.hrl"
    path.write_bytes(SEGMENT_MAGIC + b"".join(encode(f.type, f.payload) for f in frames))
    assert list(read_segment(path, chunk)) == frames


@pytest.mark.parametrize("cut", [5, 9, 12, -1, -70000])
def test_hrl_segment_that_is_cut_short_is_an_error(tmp_path: Path, cut: int) -> None:
    raw = SEGMENT_MAGIC + b"".join(
        encode(FrameType.BLOCK, BLOCK_HEAD.pack(0, n) + bytes(70000)) for n in range(3))
    path = tmp_path / "00000000.hrl"
    path.write_bytes(raw[:cut])
    with pytest.raises(ProtocolError) as e:
        list(read_segment(path, 1000))
    assert code_of(e) in {"bad_segment", "truncated"}


def test_hrl_segment_holds_only_data_frames(tmp_path: Path) -> None:
    path = tmp_path / "00000000.hrl"
    path.write_bytes(SEGMENT_MAGIC + encode_json(FrameType.END, {"cycle": "c1"}))
    with pytest.raises(ProtocolError) as e:
        list(read_segment(path))
    assert code_of(e) == "bad_segment"


async def test_frame_stream_never_pauses_short_of_its_largest_frame() -> None:
    """A mark below the largest frame would stop reading with that frame still incomplete,
    for good: the mark is raised to hold one whole frame, and such frames arrive."""
    big = encode(FrameType.BLOCK, BLOCK_HEAD.pack(0, 0) + bytes(1 << 20))
    async with stream_pair(chunk=64 << 10, high_water=256 << 10) as (stream, peer):
        assert stream.high_water > MAX_FRAME
        writer = asyncio.create_task(send_all(peer, big * 3))
        for n in range(3):
            f = await stream.next_frame(5)
            assert f.block_head() == (0, 0), n
        await writer
