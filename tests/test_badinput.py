"""Invariant 8 on the wire: bad input gets a clear error and changes nothing.

Every case runs against a real ProcServer over real mutual TLS on loopback. Each one
checks that the client got an ERROR frame with the expected code (or was refused at
the TLS handshake), that nothing changed — no cycle left in a non-aborted state, no
point in the vault, no file in the cache — and that a real agent still replicates
through the same server afterwards and its point restores byte-exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from configserver.ca import CertificateAuthority, write_bundle
from mobility.agent import Agent
from procserver import db
from procserver.server import ProcServer
from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    make_disk,
    mutate,
    open_vault,
    proc_config,
    restore_all,
    running_procserver,
    sha256,
)
from vault.point import Point
from wire.protocol import (
    BLOCK_HEAD,
    HEADER,
    MAGIC,
    MAX_CONTROL,
    MAX_FRAME,
    VERSION,
    Frame,
    FrameType,
    block_frame_parts,
    encode,
    encode_json,
    read_frame,
)

BS = 1 << 16
AGENT_DISK = (3 << 20) + 12345        # not a whole number of blocks
RAW_SIZE = (1 << 20) + 1000           # the disk a hand-driven client claims: 17 blocks
RAW_BLOCKS = 17
RAW_TAIL = 1000                       # bytes in its last block
READ = 10.0                           # how long a client waits for the server's answer
REJECTED = "siterecovery_procserver_rejected_sessions"


# -- a hand-driven client ------------------------------------------------------------------------

def client_ctx(pki: Pki, machine: str | None = "m1") -> ssl.SSLContext:
    """A client context trusting the procserver's CA; with ``machine``'s certificate, if any."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca_path)
    if machine is not None:
        ctx.load_cert_chain(*pki.client(machine))
    return ctx


def head(t: int, length: int, version: int = VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, t, length)


def block(n: int, data: bytes, disk: int = 0) -> bytes:
    h, body = block_frame_parts(FrameType.BLOCK, disk, n, data)
    return h + bytes(body)


def zero(n: int, disk: int = 0) -> bytes:
    h, body = block_frame_parts(FrameType.ZERO, disk, n)
    return h + bytes(body)


def begin_doc(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "cycle": uuid.uuid4().hex, "full": True, "consistency": "crash", "base": None,
        "disks": [{"name": "sda", "size": RAW_SIZE, "block_size": BS}]}
    doc.update(kw)
    return doc


def disk_doc(**kw: Any) -> dict[str, Any]:
    return begin_doc(disks=[{"name": "sda", "size": RAW_SIZE, "block_size": BS, **kw}])


def one_disk(**kw: Any) -> dict[str, Any]:
    return {"name": "sda", "size": RAW_SIZE, "block_size": BS, **kw}


def end_doc(cycle: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """A well-formed END, with ``fields`` replacing (or, when None, removing) entries."""
    doc: dict[str, Any] = {"cycle": cycle, "digests": {"sda": "00" * 32},
                           "created": "2030-01-01T00:00:00.000000Z",
                           "blocks": 3}  # start_cycle sends three frames
    doc.update(fields or {})
    return {k: v for k, v in doc.items() if v is not None}


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, *chunks: bytes) -> None:
        self.writer.writelines(chunks)
        await self.writer.drain()

    async def recv(self) -> Frame:
        return await read_frame(self.reader, timeout=READ)

    async def hello(self, machine: str = "m1", features: list[str] | None = None) -> None:
        doc: dict[str, Any] = {"machine": machine, "agent_version": "test"}
        if features is not None:
            doc["features"] = features
        await self.send(encode_json(FrameType.HELLO, doc))
        welcome = await self.recv()
        assert welcome.type == FrameType.WELCOME, welcome

    async def begin(self, doc: dict[str, Any]) -> None:
        await self.send(encode_json(FrameType.BEGIN, doc))
        ready = await self.recv()
        assert ready.type == FrameType.READY, ready
        assert ready.json() == {"cycle": doc["cycle"]}

    async def start_cycle(self, machine: str = "m1") -> str:
        """HELLO, BEGIN, and three valid frames: a cycle the server is receiving."""
        await self.hello(machine)
        doc = begin_doc()
        await self.begin(doc)
        await self.send(block(0, bytes(range(256)) * (BS // 256)), zero(1),
                        block(RAW_BLOCKS - 1, b"t" * RAW_TAIL))
        return str(doc["cycle"])

    async def expect_error(self, code: str) -> str:
        """The next frame is an ERROR with ``code`` and a message; return the message."""
        frame = await self.recv()
        assert frame.type == FrameType.ERROR, f"expected ERROR {code}, got {frame}"
        doc = frame.json()
        assert doc["code"] == code, doc
        assert isinstance(doc["message"], str) and doc["message"].strip(), doc
        return doc["message"]

    async def expect_closed(self) -> None:
        """The server ends the session: a close, not a frame and not a silent wait."""
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await self.recv()

    async def expect_rejected(self, code: str) -> str:
        message = await self.expect_error(code)
        await self.expect_closed()
        return message


@contextlib.asynccontextmanager
async def connect(ps: ProcServer, ctx: ssl.SSLContext) -> AsyncIterator[Peer]:
    async with asyncio.timeout(READ):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", ps.port, ssl=ctx, server_hostname="127.0.0.1")
    try:
        yield Peer(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def refused_at_handshake(ps: ProcServer, ctx: ssl.SSLContext, tls: str = "1.3") -> None:
    """The TLS handshake fails: no session, whatever the client sends.

    With TLS 1.2 the server checks the client certificate inside the handshake, so
    ``open_connection`` itself must fail. With TLS 1.3 the client finishes its side of
    the handshake before the server has checked its certificate, so the refusal shows
    up as a close (or an alert) on the first read, and never as a WELCOME.
    """
    if tls == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            async with asyncio.timeout(READ):
                _reader, writer = await asyncio.open_connection(
                    "127.0.0.1", ps.port, ssl=ctx, server_hostname="127.0.0.1")
        except (ssl.SSLError, ConnectionError):
            return
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)
        pytest.fail("the TLS 1.2 handshake succeeded without a valid client certificate")
    got = b""
    with contextlib.suppress(ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        async with connect(ps, ctx) as peer:
            peer.writer.write(encode_json(FrameType.HELLO, {"machine": "m1"}))
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await peer.writer.drain()
            async with asyncio.timeout(READ):
                got = await peer.reader.read()
    assert got == b"", f"the server answered a client it should have refused: {got!r}"


# -- the bench: the state a bad client must not change ------------------------------------------

@dataclass
class Bench:
    ps: ProcServer
    tmp: Path
    pki: Pki
    key: Path
    good: list[str] = field(default_factory=list)

    def ctx(self, machine: str | None = "m1") -> ssl.SSLContext:
        return client_ctx(self.pki, machine)

    def connect(self, machine: str | None = "m1") -> contextlib.AbstractAsyncContextManager[Peer]:
        return connect(self.ps, self.ctx(machine))

    async def cycles(self) -> list[db.Cycle]:
        async with self.ps.sessionmaker() as s:
            return list((await s.execute(select(db.Cycle).order_by(db.Cycle.seq))
                         ).scalars().all())

    async def cycle_state(self, cycle: str) -> str | None:
        return next((c.state for c in await self.cycles() if c.id == cycle), None)

    async def points(self) -> list[Point]:
        vault = await open_vault(self.tmp / "vault", self.key)
        try:
            return await vault.list_points()
        finally:
            await vault.close()

    def cache_files(self) -> list[Path]:
        return sorted(p for p in self.ps.cache_dir.rglob("*") if not p.is_dir())

    async def assert_unchanged(self) -> None:
        """Only the good agents' cycles exist: nothing else live, stored or cached."""
        live = [(c.id, c.state) for c in await self.cycles() if c.state != db.ABORTED]
        assert live == [(c, db.UPLOADED) for c in self.good]
        assert sorted(p.cycle for p in await self.points()) == sorted(self.good)
        assert self.cache_files() == []

    async def replicate(self, machine: str = "m1", agent: Agent | None = None) -> str:
        """A real agent cycle through the same server; its point restores byte-exact."""
        disk = self.tmp / f"{machine}.img"
        if disk.exists():
            mutate(disk, 0.2, seed=len(self.good))
        else:
            make_disk(disk, AGENT_DISK, seed=3)
            with open(disk, "r+b") as f:  # data in the short last block, too
                f.seek(AGENT_DISK - 5000)
                f.write(b"tail" * 1250)
        agent = agent or make_agent(agent_config(self.tmp, self.pki, machine, self.ps.port,
                                                 {"sda": disk}))
        try:
            r = await agent.replicate_once()
        finally:
            agent.close()
        assert r.blocks_sent > 0
        point_id = await self.ps.wait_point(r.cycle, timeout=30)
        vault = await open_vault(self.tmp / "vault", self.key)
        try:
            point = await vault.read_point(point_id)
            assert (point.machine, point.cycle) == (machine, r.cycle)
            restored = await restore_all(vault, point, self.tmp / "restore" / r.cycle)
        finally:
            await vault.close()
        assert restored == {"sda": sha256(disk)}
        self.good.append(r.cycle)
        await self.assert_unchanged()
        return r.cycle

    async def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.ps.metrics_port}/metrics"
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            assert resp.status == 200
            return await resp.text()

    async def rejections(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(await self.scrape()):
            if fam.name == REJECTED:
                for sample in fam.samples:
                    if sample.name == REJECTED + "_total":
                        out[sample.labels["reason"]] = sample.value
        return out

    async def cache_bytes_metric(self) -> float:
        for fam in text_string_to_metric_families(await self.scrape()):
            if fam.name == "siterecovery_procserver_cache_bytes":
                return fam.samples[0].value
        raise AssertionError("no cache_bytes gauge")


@pytest.fixture
def bench(tmp_path: Path, pki: Pki, procserver: ProcServer,
          vault_at: tuple[str, Path]) -> Bench:
    return Bench(procserver, tmp_path, pki, vault_at[1])


@pytest.fixture
async def quick(tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> AsyncIterator[Bench]:
    """A process server with a 1-second idle timeout."""
    url, key = vault_at
    cfg = proc_config(tmp_path / "quick", pki, url, key, idle_timeout_seconds=1.0)
    async with running_procserver(cfg) as ps:
        yield Bench(ps, tmp_path, pki, key)


async def rejected_then_recovers(b: Bench, code: str, cycle: str | None = None) -> None:
    """After a rejection: counted once, its cycle (if any) aborted, nothing changed, and a
    real agent still replicates through the same server."""
    assert (await b.rejections()).get(code) == 1
    if cycle is not None:
        assert await b.cycle_state(cycle) == db.ABORTED
    await b.assert_unchanged()
    await b.replicate()


# -- before the session: garbage instead of HELLO -----------------------------------------------

PRE_HELLO = {
    "garbage": (b"\x00\x13\x37 this is not a replication stream \xff\xfe" * 8, "bad_magic"),
    "http-request": (b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "bad_magic"),
    "bad-version": (head(FrameType.HELLO, 2, version=2) + b"{}", "bad_version"),
    "unknown-type": (head(0x42, 0), "bad_type"),
    "oversized-hello": (head(FrameType.HELLO, MAX_CONTROL + 1), "frame_too_large"),
    "hello-claims-4gib": (head(FrameType.HELLO, 0xFFFFFFFF), "frame_too_large"),
    "oversized-block-first": (head(FrameType.BLOCK, MAX_FRAME + 1), "frame_too_large"),
    "begin-before-hello": (encode_json(FrameType.BEGIN, begin_doc()), "expected_hello"),
    "block-before-hello": (block(0, bytes(BS)), "expected_hello"),
    "hello-not-json": (encode(FrameType.HELLO, b"machine=m1"), "bad_json"),
    "hello-not-utf8": (encode(FrameType.HELLO, b"\xff\xfe\xfd"), "bad_json"),
    "hello-json-array": (encode(FrameType.HELLO, b'["m1"]'), "bad_json"),
    "hello-without-machine": (encode_json(FrameType.HELLO, {}), "wrong_machine"),
    "hello-machine-not-a-string": (encode_json(FrameType.HELLO, {"machine": ["m1"]}),
                                   "wrong_machine"),
}


@pytest.mark.parametrize("case", PRE_HELLO)
async def test_bad_first_frame_is_refused(bench: Bench, case: str) -> None:
    raw, code = PRE_HELLO[case]
    async with bench.connect() as peer:
        await peer.send(raw)
        message = await peer.expect_rejected(code)
    if code == "frame_too_large":
        assert "exceeds" in message
    await rejected_then_recovers(bench, code)


async def test_certificate_for_m1_claiming_m2_is_wrong_machine(bench: Bench) -> None:
    async with bench.connect("m1") as peer:
        await peer.send(encode_json(FrameType.HELLO, {"machine": "m2"}))
        message = await peer.expect_rejected("wrong_machine")
    assert "'m1'" in message and "'m2'" in message
    await rejected_then_recovers(bench, "wrong_machine")
    # ... and the machine that was impersonated is untouched too.
    assert {p.machine for p in await bench.points()} == {"m1"}


# -- TLS: no certificate, or a certificate from another CA ---------------------------------------

@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_client_without_certificate_is_refused_at_handshake(bench: Bench, tls: str) -> None:
    await refused_at_handshake(bench.ps, bench.ctx(None), tls)
    assert await bench.rejections() == {}  # never became a session
    await bench.assert_unchanged()
    await bench.replicate()


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_client_with_certificate_from_another_ca_is_refused(bench: Bench, tls: str) -> None:
    other = CertificateAuthority.load_or_create(bench.tmp / "other-ca")
    cert, key, _ = write_bundle(bench.tmp / "other-client", "agent",
                                other.issue_client("m1"), other.cert_pem)
    ctx = bench.ctx(None)
    ctx.load_cert_chain(cert, key)
    await refused_at_handshake(bench.ps, ctx, tls)
    assert await bench.rejections() == {}
    await bench.assert_unchanged()
    await bench.replicate()


# -- BEGIN: invalid fields are refused before anything is recorded -------------------------------

BAD_BEGIN: dict[str, Any] = {
    "block-size-4k": disk_doc(block_size=4096),
    "block-size-2m": disk_doc(block_size=2 << 20),
    "block-size-not-power-of-two": disk_doc(block_size=3 * BS),
    "block-size-string": disk_doc(block_size="65536"),
    "block-size-missing": begin_doc(disks=[{"name": "sda", "size": RAW_SIZE}]),
    "no-disks": begin_doc(disks=[]),
    "disks-missing": {k: v for k, v in begin_doc().items() if k != "disks"},
    "disks-not-a-list": begin_doc(disks="sda"),
    "disk-not-an-object": begin_doc(disks=["sda"]),
    "too-many-disks": begin_doc(disks=[{"name": f"d{i}", "size": BS, "block_size": BS}
                                       for i in range(65)]),
    "duplicate-disk-names": begin_doc(disks=[{"name": "sda", "size": BS, "block_size": BS}] * 2),
    "disk-name-path": disk_doc(name="../../etc/passwd"),
    "disk-name-empty": disk_doc(name=""),
    "disk-size-zero": disk_doc(size=0),
    "disk-size-negative": disk_doc(size=-BS),
    "disk-size-over-64tib": disk_doc(size=(64 << 40) + 1),
    "disk-size-float": disk_doc(size=1.5e6),
    "cycle-empty": begin_doc(cycle=""),
    "cycle-uppercase": begin_doc(cycle="ABC"),
    "cycle-path": begin_doc(cycle="../../x"),
    "cycle-too-long": begin_doc(cycle="a" * 65),
    "cycle-not-a-string": begin_doc(cycle=42),
    "cycle-missing": {k: v for k, v in begin_doc().items() if k != "cycle"},
    "full-not-a-bool": begin_doc(full="yes"),
    "consistency-unknown": begin_doc(consistency="perfect"),
    "delta-without-base": begin_doc(full=False, base=None),
    "delta-base-path": begin_doc(full=False, base="../x"),
}


@pytest.mark.parametrize("case", BAD_BEGIN)
async def test_begin_with_invalid_fields_is_refused(bench: Bench, case: str) -> None:
    async with bench.connect() as peer:
        await peer.hello()
        await peer.send(encode_json(FrameType.BEGIN, BAD_BEGIN[case]))
        await peer.expect_rejected("bad_begin")
    assert await bench.cycles() == []  # refused before anything was recorded
    await rejected_then_recovers(bench, "bad_begin")


OTHER_AFTER_HELLO = {
    "begin-not-json": (encode(FrameType.BEGIN, b"cycle=1"), "bad_json"),
    "begin-json-array": (encode(FrameType.BEGIN, b"[]"), "bad_json"),
    "oversized-begin": (head(FrameType.BEGIN, MAX_CONTROL + 1), "frame_too_large"),
    "block-instead-of-begin": (block(0, bytes(BS)), "expected_begin"),
    "second-hello": (encode_json(FrameType.HELLO, {"machine": "m1"}), "expected_begin"),
    "end-without-begin": (encode_json(FrameType.END, end_doc("c1")), "expected_begin"),
    "garbage-after-hello": (b"\xde\xad\xbe\xef" * 16, "bad_magic"),
    # Without the "resync" feature in HELLO, BASIS is just another frame out of place.
    "basis-without-the-feature": (encode_json(FrameType.BASIS, {"disks": [one_disk()]}),
                                  "expected_begin"),
    "map-from-an-agent": (encode(FrameType.MAP, BLOCK_HEAD.pack(0, 0) + bytes(16)),
                          "expected_begin"),
    "fetch-without-the-feature": (encode_json(FrameType.FETCH, {"point": "ab" * 32,
                                  "disk": "sda", "blocks": [0]}), "expected_begin"),
}


@pytest.mark.parametrize("case", OTHER_AFTER_HELLO)
async def test_bad_frame_after_hello_is_refused(bench: Bench, case: str) -> None:
    raw, code = OTHER_AFTER_HELLO[case]
    async with bench.connect() as peer:
        await peer.hello()
        await peer.send(raw)
        await peer.expect_rejected(code)
    assert await bench.cycles() == []
    await rejected_then_recovers(bench, code)


BAD_BASIS: dict[str, dict[str, Any]] = {
    "no-disks": {},
    "disks-not-a-list": {"disks": "sda"},
    "empty-disks": {"disks": []},
    "bad-disk-name": {"disks": [one_disk(name="../sda")]},
    "bad-block-size": {"disks": [one_disk(block_size=4096)]},
    "duplicate-disks": {"disks": [one_disk(), one_disk()]},
}


@pytest.mark.parametrize("case", BAD_BASIS)
async def test_basis_with_invalid_disks_is_refused(bench: Bench, case: str) -> None:
    async with bench.connect() as peer:
        await peer.hello(features=["resync"])
        await peer.send(encode_json(FrameType.BASIS, BAD_BASIS[case]))
        await peer.expect_rejected("bad_basis")
    assert await bench.cycles() == []
    await rejected_then_recovers(bench, "bad_basis")


async def test_basis_without_a_point_is_no_basis_and_the_session_goes_on(bench: Bench) -> None:
    async with bench.connect() as peer:
        await peer.hello(features=["resync"])
        await peer.send(encode_json(FrameType.BASIS, {"disks": [one_disk()]}))
        assert "no recovery point" in await peer.expect_error("no_basis")
        doc = begin_doc()
        await peer.begin(doc)  # the same session goes on with a full cycle
    assert [c.id for c in await bench.cycles()] == [doc["cycle"]]


@pytest.mark.parametrize("doc", [begin_doc(cycle="abc\n"), disk_doc(name="sda\n"),
                                 begin_doc(full=False, base="abc\n")],
                         ids=["cycle", "disk-name", "base"])
async def test_begin_ids_with_trailing_newline_are_refused(bench: Bench,
                                                           doc: dict[str, Any]) -> None:
    async with bench.connect() as peer:
        await peer.hello()
        await peer.send(encode_json(FrameType.BEGIN, doc))
        await peer.expect_rejected("bad_begin")
    await rejected_then_recovers(bench, "bad_begin")


@pytest.mark.parametrize("base", [[1], {"cycle": "x"}], ids=["list", "object"])
async def test_full_begin_with_a_malformed_base_is_refused(bench: Bench, base: object) -> None:
    async with bench.connect() as peer:
        await peer.hello()
        await peer.send(encode_json(FrameType.BEGIN, begin_doc(base=base)))
        await peer.expect_rejected("bad_begin")
    await rejected_then_recovers(bench, "bad_begin")


async def test_deeply_nested_hello_is_refused(bench: Bench) -> None:
    async with bench.connect() as peer:
        await peer.send(encode(FrameType.HELLO, b"[" * 60000))
        await peer.expect_rejected("bad_json")
    await rejected_then_recovers(bench, "bad_json")


# -- BEGIN that refers to cycles: resync, other machines, duplicates -----------------------------

async def test_delta_on_an_unknown_base_asks_for_resync(bench: Bench) -> None:
    async with bench.connect() as peer:
        await peer.hello()
        await peer.send(encode_json(FrameType.BEGIN, begin_doc(full=False, base="no-such-cycle")))
        message = await peer.expect_error("resync_required")
        assert "no-such-cycle" in message
        # Not a rejection: the session stays open for the full cycle the agent sends next.
        doc = begin_doc()
        await peer.begin(doc)
    # The client went away without END: that cycle is aborted, never acknowledged.
    await bench.replicate()  # the uploader is in arrival order: this waits out the abort
    assert await bench.cycle_state(doc["cycle"]) == db.ABORTED
    assert (await bench.rejections()).get("resync_required") is None


async def test_begins_that_refer_to_existing_cycles(bench: Bench) -> None:
    m1 = await bench.replicate("m1")
    m2 = await bench.replicate("m2")
    m1_disk = {"name": "sda", "size": AGENT_DISK, "block_size": BS}
    cases = [
        # a delta on another machine's cycle: that is not this machine's history
        begin_doc(full=False, base=m2, disks=[m1_disk]),
        # a delta on our own cycle, but the disk layout changed
        begin_doc(full=False, base=m1, disks=[{**m1_disk, "size": AGENT_DISK + BS}]),
        begin_doc(full=False, base=m1, disks=[{**m1_disk, "block_size": 2 * BS}]),
        begin_doc(full=False, base=m1, disks=[m1_disk, {"name": "sdb", "size": BS,
                                                        "block_size": BS}]),
    ]
    async with bench.connect() as peer:
        await peer.hello()
        for doc in cases:
            await peer.send(encode_json(FrameType.BEGIN, doc))
            await peer.expect_error("resync_required")
    async with bench.connect() as peer:  # a cycle id that was already sent
        await peer.hello()
        await peer.send(encode_json(FrameType.BEGIN, begin_doc(cycle=m1)))
        await peer.expect_rejected("duplicate_cycle")
    async with bench.connect("m2") as peer:  # ... even by another machine
        await peer.hello("m2")
        await peer.send(encode_json(FrameType.BEGIN, begin_doc(cycle=m1)))
        await peer.expect_rejected("duplicate_cycle")
    assert (await bench.rejections()).get("duplicate_cycle") == 2
    await bench.assert_unchanged()
    await bench.replicate("m1")  # a delta on m1's own history still works


# -- inside a cycle: the partial cycle is aborted, nothing is acknowledged -----------------------

MID_CYCLE_FRAMES: dict[str, tuple[bytes, str]] = {
    "oversized-block-header": (head(FrameType.BLOCK, MAX_FRAME + 1), "frame_too_large"),
    "block-header-claims-4gib": (head(FrameType.BLOCK, 0xFFFFFFFF), "frame_too_large"),
    "oversized-zero-header": (head(FrameType.ZERO, MAX_FRAME + 1), "frame_too_large"),
    "oversized-end": (head(FrameType.END, MAX_CONTROL + 1), "frame_too_large"),
    "block-beyond-disk": (block(RAW_BLOCKS, bytes(BS)), "bad_block"),
    "block-far-beyond-disk": (block((1 << 64) - 1, bytes(BS)), "bad_block"),
    "zero-beyond-disk": (zero(RAW_BLOCKS), "bad_block"),
    "block-on-unknown-disk": (block(0, bytes(BS), disk=1), "bad_block"),
    "block-data-short": (block(2, bytes(BS - 1)), "bad_block"),
    "block-data-long": (block(2, bytes(BS + 1)), "bad_block"),
    "block-empty": (block(2, b""), "bad_block"),
    "last-block-full-size": (block(RAW_BLOCKS - 1, bytes(BS)), "bad_block"),
    "last-block-short": (block(RAW_BLOCKS - 1, bytes(RAW_TAIL - 1)), "bad_block"),
    "zero-with-data": (encode(FrameType.ZERO, BLOCK_HEAD.pack(0, 2) + b"x"), "bad_block"),
    "block-without-block-header": (encode(FrameType.BLOCK, b"\x00" * 5), "bad_block"),
    "block-sent-twice": (block(2, b"x" * BS) + block(2, b"y" * BS), "bad_block"),
    "zero-after-block": (block(3, b"x" * BS) + zero(3), "bad_block"),
    "end-not-json": (encode(FrameType.END, b"done"), "bad_json"),
    "hello-in-cycle": (encode_json(FrameType.HELLO, {"machine": "m1"}), "unexpected_frame"),
    "begin-in-cycle": (encode_json(FrameType.BEGIN, begin_doc()), "unexpected_frame"),
    "ack-from-client": (encode_json(FrameType.ACK, {"cycle": "x"}), "unexpected_frame"),
    "garbage-in-cycle": (b"\x00garbage\xff" * 64, "bad_magic"),
    "bad-version-in-cycle": (head(FrameType.BLOCK, 10, version=0) + bytes(10), "bad_version"),
    "unknown-type-in-cycle": (head(200, 0), "bad_type"),
}
# END frames that do not close the cycle they are in: changes to a well-formed END.
BAD_ENDS: dict[str, dict[str, Any]] = {
    "end-without-digests": {"digests": None},
    "end-with-no-digest": {"digests": {}},
    "end-digest-for-other-disk": {"digests": {"sdb": "00" * 32}},
    "end-extra-digest": {"digests": {"sda": "00" * 32, "sdb": "00" * 32}},
    "end-digests-list": {"digests": ["00" * 32]},
    "end-without-cycle": {"cycle": None},
    "end-other-cycle": {"cycle": "another-cycle"},
    "end-without-block-count": {"blocks": None},
    "end-with-wrong-block-count": {"blocks": 2},
}
MID_CYCLE = [*MID_CYCLE_FRAMES, *BAD_ENDS]


def mid_cycle_bytes(case: str, cycle: str) -> tuple[bytes, str]:
    if case in BAD_ENDS:
        return encode_json(FrameType.END, end_doc(cycle, BAD_ENDS[case])), "bad_end"
    return MID_CYCLE_FRAMES[case]


@pytest.mark.parametrize("case", MID_CYCLE)
async def test_bad_frame_mid_cycle_aborts_the_cycle(bench: Bench, case: str) -> None:
    async with bench.connect() as peer:
        cycle = await peer.start_cycle()
        assert await bench.cycle_state(cycle) == db.RECEIVING
        raw, code = mid_cycle_bytes(case, cycle)
        await peer.send(raw)
        await peer.expect_rejected(code)  # an ERROR, never an ACK
    await rejected_then_recovers(bench, code, cycle)


@pytest.mark.parametrize("fields", [{"created": 12345}, {"digests": {"sda": 5}},
                                    {"digests": {"sda": "not a digest"}}],
                         ids=["created-number", "digest-number", "digest-not-hex"])
async def test_end_with_malformed_fields_is_refused(bench: Bench,
                                                    fields: dict[str, Any]) -> None:
    async with bench.connect() as peer:
        cycle = await peer.start_cycle()
        await peer.send(encode_json(FrameType.END, end_doc(cycle, fields)))
        await peer.expect_rejected("bad_end")
    await rejected_then_recovers(bench, "bad_end", cycle)


async def test_aborted_cycle_releases_its_cache_reservation(bench: Bench) -> None:
    assert await bench.cache_bytes_metric() == 0
    async with bench.connect() as peer:
        await peer.start_cycle()
        await peer.send(head(FrameType.BLOCK, MAX_FRAME + 1))
        await peer.expect_rejected("frame_too_large")
    assert bench.cache_files() == []
    assert await bench.cache_bytes_metric() == 0


# -- truncation: the connection ends in the middle of a frame ------------------------------------

TRUNCATIONS = {
    "mid-header": head(FrameType.BLOCK, BLOCK_HEAD.size + BS)[:5],
    "mid-block": block(2, b"b" * BS)[: HEADER.size + BS // 2],
    "mid-end": encode_json(FrameType.END, end_doc("x"))[:-3],
}


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("where", TRUNCATIONS)
async def test_truncated_frame_mid_cycle_aborts_the_cycle(bench: Bench, where: str,
                                                          how: str) -> None:
    async with bench.connect() as peer:
        cycle = await peer.start_cycle()
        await peer.send(TRUNCATIONS[where])
        if how == "reset":
            peer.writer.transport.abort()
    # The uploader turns cycles into points in arrival order, so the good cycle's point
    # appears only once the truncated cycle (which arrived first) has been settled.
    await bench.replicate()
    assert await bench.cycle_state(cycle) == db.ABORTED
    if how == "close":
        assert (await bench.rejections()).get("truncated") == 1


# -- slow loris: every read has a timeout ---------------------------------------------------------

async def test_silent_client_is_closed_after_the_idle_timeout(quick: Bench) -> None:
    async with quick.connect() as peer, asyncio.timeout(3):
        await peer.expect_rejected("timeout")
    await rejected_then_recovers(quick, "timeout")


async def test_client_silent_after_hello_is_closed_after_the_idle_timeout(quick: Bench) -> None:
    async with quick.connect() as peer:
        await peer.hello()
        async with asyncio.timeout(4):
            await peer.expect_rejected("timeout")
    await rejected_then_recovers(quick, "timeout")


@pytest.mark.parametrize("stall", ["between-frames", "mid-frame"])
async def test_client_stalling_mid_cycle_is_closed_and_its_cycle_aborted(quick: Bench,
                                                                         stall: str) -> None:
    async with quick.connect() as peer:
        cycle = await peer.start_cycle()
        if stall == "mid-frame":
            await peer.send(block(2, bytes(BS))[:100])
        async with asyncio.timeout(4):
            await peer.expect_rejected("timeout")
    await rejected_then_recovers(quick, "timeout", cycle)


# -- a bad session does not disturb a good one -------------------------------------------------

class Gate:
    """A snapshot provider that holds the agent after its last block, before END: the good
    cycle is provably in the middle of being received while the bad clients run."""

    def __init__(self) -> None:
        self.in_cycle = asyncio.Event()
        self.release = asyncio.Event()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[str]:
        yield "crash"
        self.in_cycle.set()
        await self.release.wait()


async def test_rejected_sessions_do_not_disturb_a_concurrent_good_session(bench: Bench) -> None:
    gate = Gate()
    agent = Agent(agent_config(bench.tmp, bench.pki, "m1", bench.ps.port,
                               {"sda": bench.tmp / "m1.img"}), provider=gate)

    async def garbage() -> None:
        async with bench.connect("m2") as peer:
            await peer.send(b"\x00garbage\xff" * 64)
            await peer.expect_rejected("bad_magic")

    async def impostor() -> None:  # m2 claims to be the machine that is replicating
        async with bench.connect("m2") as peer:
            await peer.send(encode_json(FrameType.HELLO, {"machine": "m1"}))
            await peer.expect_rejected("wrong_machine")

    async def bad_block(n: int) -> None:
        # one machine each: a newer BEGIN of a machine cuts the session of its older cycle
        async with bench.connect(f"b{n}") as peer:
            await peer.start_cycle(f"b{n}")
            await peer.send(head(FrameType.BLOCK, MAX_FRAME + 1))
            await peer.expect_rejected("frame_too_large")

    async def no_cert() -> None:
        await refused_at_handshake(bench.ps, bench.ctx(None))

    good = asyncio.create_task(bench.replicate("m1", agent=agent))
    try:
        async with asyncio.timeout(30):
            await gate.in_cycle.wait()
        assert [(c.machine, c.state) for c in await bench.cycles()] == [("m1", db.RECEIVING)]
        async with asyncio.timeout(30):
            await asyncio.gather(*(c for n in range(3) for c in (
                garbage(), impostor(), bad_block(n), no_cert())))
        assert await bench.rejections() == {"bad_magic": 3, "wrong_machine": 3,
                                            "frame_too_large": 3}
        assert [c.state for c in await bench.cycles() if c.machine == "m1"] == [db.RECEIVING]
    finally:
        gate.release.set()
        async with asyncio.timeout(60):
            await good  # acknowledged, uploaded, restores byte-exact, nothing else stored
    assert {p.machine for p in await bench.points()} == {"m1"}


async def test_stalled_session_does_not_hold_back_other_machines_points(bench: Bench) -> None:
    async with bench.connect("m2") as peer:
        await peer.start_cycle("m2")  # ... and then nothing, for up to idle_timeout (60 s)
        disk = bench.tmp / "m1.img"
        make_disk(disk, AGENT_DISK, seed=4)
        agent = make_agent(agent_config(bench.tmp, bench.pki, "m1", bench.ps.port,
                                        {"sda": disk}))
        try:
            r = await agent.replicate_once()  # acknowledged: the cache has it
        finally:
            agent.close()
        await bench.ps.wait_point(r.cycle, timeout=3)


# -- the metrics endpoint counts every rejection by reason ---------------------------------------

async def test_metrics_count_rejections_by_reason(bench: Bench) -> None:
    assert await bench.rejections() == {}

    async def bad_magic(peer: Peer) -> None:
        await peer.send(b"NOT A FRAME AT ALL")

    async def wrong_machine(peer: Peer) -> None:
        await peer.send(encode_json(FrameType.HELLO, {"machine": "m9"}))

    async def bad_begin(peer: Peer) -> None:
        await peer.hello()
        await peer.send(encode_json(FrameType.BEGIN, disk_doc(block_size=1000)))

    async def bad_block(peer: Peer) -> None:
        await peer.start_cycle()
        await peer.send(block(RAW_BLOCKS, bytes(BS)))

    script: list[tuple[str, Callable[[Peer], Awaitable[None]]]] = [
        ("bad_magic", bad_magic), ("wrong_machine", wrong_machine),
        ("wrong_machine", wrong_machine), ("bad_begin", bad_begin),
        ("bad_block", bad_block), ("bad_magic", bad_magic), ("bad_magic", bad_magic)]
    for code, act in script:
        async with bench.connect() as peer:
            await act(peer)
            await peer.expect_rejected(code)
    await refused_at_handshake(bench.ps, bench.ctx(None))  # not a session: not counted
    assert await bench.rejections() == {"bad_magic": 3, "wrong_machine": 2, "bad_begin": 1,
                                        "bad_block": 1}
    text = await bench.scrape()
    assert f'{REJECTED}_total{{reason="bad_magic"}} 3.0' in text
    await bench.replicate()  # a good cycle is not a rejection
    assert sum((await bench.rejections()).values()) == len(script)
