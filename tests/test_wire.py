"""Unit tests of the replication frame codec (procserver/wire.py) — invariants 7 and 8.

Every byte string is either a valid frame or a ProtocolError, never another
exception; a declared length above the cap is refused from the header alone,
before any payload is read or allocated; every read has a timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procserver.wire import (
    BLOCK_HEAD,
    CONTROL,
    HEADER,
    MAGIC,
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
    parse_header,
    raise_if_error,
    read_frame,
)

T = TypeVar("T")
DATA_TYPES = (FrameType.BLOCK, FrameType.ZERO)
CONTROL_DOCS: dict[FrameType, dict[str, object]] = {
    FrameType.HELLO: {"machine": "web01", "agent_version": "0.1.0"},
    FrameType.WELCOME: {"server": "siterecovery-procserver", "max_frame": MAX_FRAME},
    FrameType.BEGIN: {"cycle": "c1", "full": True, "consistency": "crash", "base": None,
                      "disks": [{"name": "sda", "size": 1 << 20, "block_size": 1 << 16}]},
    FrameType.READY: {"cycle": "c1"},
    FrameType.END: {"cycle": "c1", "digests": {"sda": "ab" * 32}, "created": "x"},
    FrameType.ACK: {"cycle": "c1"},
    FrameType.ERROR: {"code": "bad_block", "message": "no", "hint": "send less"},
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


@pytest.mark.parametrize("t", [0, 10, 11, 128, 255])
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
