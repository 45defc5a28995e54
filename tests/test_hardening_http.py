"""Issue #12 items 1, 9, 10: untrusted JSON, TLS suites and handshake logs, HTTP headers.

Against real servers on loopback: the configuration server's admin listener (plain HTTP,
loopback) and site listener (TLS, 9441's role), and a process server's 9443 listener.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from jsonschema import Draft202012Validator

from common.logthrottle import OVERFLOW, LogThrottle
from configserver import support
from configserver.server import ConfigServer
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import Pki
from wire.protocol import FrameType, ProtocolError, decode, encode

# TLS 1.2 suites in CBC mode (MAC-then-encrypt) that Python's default server list offers.
CBC_ONLY = "ECDHE+AES+SHA256:ECDHE+AES+SHA384:ECDHE+AES+SHA1"
AEAD_1_2 = "ECDHE+AESGCM"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _auth(cs: ConfigServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {cs.admin_token}", "Content-Type": "application/json"}


# ---- item 1: JSON nested deeper than any document of the API ----------------------------

async def test_deeply_nested_body_is_refused_with_400(cs: ConfigServer,
                                                      http: aiohttp.ClientSession) -> None:
    """~200 KB of ``[[[…]]]`` made json.loads raise RecursionError: HTTP 500 and a
    traceback. Now 400 ``bad_json`` with a message, like any other malformed body; and
    so is nesting that the decoder survives but no schema of ours has."""
    deep = b"[" * 100_000 + b"]" * 100_000
    moderately = b'{"name": "m1", "disks": ' + b"[" * 200 + b"]" * 200 + b"}"
    for body in (deep, moderately):
        async with http.post(f"{cs.url}/api/v1/machines", data=body,
                             headers=_auth(cs)) as r:
            doc = await r.json()
            assert r.status == 400, doc
        assert doc["error"]["code"] == "bad_json"
        assert "levels deep" in doc["error"]["message"]
    # a body of ordinary depth still reaches schema validation (422, not 400)
    async with http.post(f"{cs.url}/api/v1/machines", data=b'{"name": [[["x"]]]}',
                         headers=_auth(cs)) as r:
        assert r.status == 422, await r.text()


def test_control_frame_nested_too_deeply_is_a_protocol_error() -> None:
    """The 9443 control frames parse untrusted JSON too: a bomb is ``bad_json``."""
    frame, _ = decode(encode(FrameType.HELLO, b"[" * 30_000 + b"]" * 30_000))
    with pytest.raises(ProtocolError) as e:
        frame.json()
    assert e.value.code == "bad_json"


# ---- item 10: 405 names the allowed methods ----------------------------------------------

async def test_405_carries_an_allow_header(cs: ConfigServer,
                                           http: aiohttp.ClientSession) -> None:
    async with http.request("PATCH", f"{cs.url}/api/v1/policies",
                            headers=_auth(cs)) as r:
        assert r.status == 405
        allowed = {m.strip() for m in r.headers["Allow"].split(",")}
        assert (await r.json())["error"]["code"] == "method_not_allowed"
    assert {"GET", "POST"} <= allowed and "PATCH" not in allowed


# ---- item 9: security headers --------------------------------------------------------------

def _site_client_tls(cs: ConfigServer, *, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cs.ca.cert_path))
    if ciphers is not None:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
    return ctx


async def test_security_headers_on_both_listeners(cs: ConfigServer,
                                                  http: aiohttp.ClientSession) -> None:
    """Admin answers (success and error) are never cached nor sniffed; the HTTPS site
    listener adds HSTS (which the plain loopback listener must not send)."""
    for path, headers in (("/api/v1/policies", _auth(cs)), ("/api/v1/policies", {}),
                          ("/healthz", {}), ("/no/such/path", {})):
        async with http.get(cs.url + path, headers=headers) as r:
            assert r.headers.get("Cache-Control") == "no-store", (path, r.status)
            assert r.headers.get("X-Content-Type-Options") == "nosniff", path
            assert "Strict-Transport-Security" not in r.headers
    for path in ("/healthz", "/api/v1/agent/settings"):  # 200 and 401
        async with http.get(cs.site_url + path, ssl=_site_client_tls(cs)) as r:
            assert r.headers.get("Cache-Control") == "no-store", (path, r.status)
            assert r.headers.get("X-Content-Type-Options") == "nosniff"
            assert r.headers.get("Strict-Transport-Security", "").startswith("max-age="), path


# ---- item 9: AEAD suites only, rejected handshakes logged ----------------------------------

async def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    """Complete a TLS handshake with 127.0.0.1:port; return the negotiated suite."""
    _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10)
    try:
        suite = w.get_extra_info("cipher")
        return str(suite[0])
    finally:
        w.close()
        await w.wait_closed()


async def test_cbc_only_client_is_refused_on_the_site_listener(cs: ConfigServer) -> None:
    assert "GCM" in await _handshake(cs.site_port, _site_client_tls(cs, ciphers=AEAD_1_2))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(cs.site_port, _site_client_tls(cs, ciphers=CBC_ONLY))


def _agent_tls(pki: Pki, *, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca_path)
    ctx.load_cert_chain(*pki.client("m1"))
    if ciphers is not None:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
    return ctx


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_cbc_only_client_is_refused_on_9443_and_logged_once_a_minute(
        procserver: ProcServer, pki: Pki) -> None:
    """A CBC-only agent (with a valid certificate) is refused; the refusal is logged, one
    line per peer per interval, the next line counting the ones held back."""
    clock = FakeClock()
    seen = SeenThrottle(60.0, clock=clock)
    procserver.listener.handshake_log = seen
    assert "GCM" in await _handshake(procserver.port, _agent_tls(pki, ciphers=AEAD_1_2))
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await _handshake(procserver.port, _agent_tls(pki, ciphers=CBC_ONLY))
        await seen.wait_for(3)
        lines = [e for e in logs if e["event"] == "tls_handshake_rejected"]
        assert len(lines) == 1, lines
        assert lines[0]["peer"] == "127.0.0.1" and lines[0]["reason"] == "failed"
        assert lines[0]["suppressed"] == 0 and lines[0]["log_level"] == "warning"
        clock.t += 61
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _handshake(procserver.port, _agent_tls(pki, ciphers=CBC_ONLY))
        await seen.wait_for(4)
        lines = [e for e in logs if e["event"] == "tls_handshake_rejected"]
        assert [e["suppressed"] for e in lines] == [0, 2]
    assert procserver.metrics.rejected_handshakes.labels("failed")._value.get() == 4


class SeenThrottle(LogThrottle):
    """The real throttle, telling the test how many events it has been asked about (the
    server refuses a handshake a moment after the client sees it fail)."""

    def __init__(self, interval: float, *, clock: FakeClock) -> None:
        super().__init__(interval, clock=clock)
        self.events = 0
        self.changed = asyncio.Event()

    def admit(self, key: str) -> int | None:
        self.events += 1
        self.changed.set()
        return super().admit(key)

    async def wait_for(self, n: int) -> None:
        async with asyncio.timeout(10):
            while self.events < n:
                self.changed.clear()
                await self.changed.wait()


def test_log_throttle_counts_what_it_suppressed() -> None:
    clock = FakeClock()
    t = LogThrottle(60.0, max_keys=2, clock=clock)
    assert t.admit("a") == 0
    assert t.admit("a") is None and t.admit("a") is None
    assert t.admit("b") == 0
    assert t.admit("c") == 0 and t.admit("d") is None  # both beyond max_keys: one slot
    clock.t += 60
    assert t.admit("a") == 2
    assert t.admit(OVERFLOW) == 1


def _testssl_suites(port: int, workdir: Path) -> list[dict[str, Any]]:
    exe = shutil.which("testssl") or shutil.which("testssl.sh")
    if exe is None:
        missing_backend("testssl.sh", "apt-get install testssl.sh")
    assert exe is not None
    out = workdir / f"testssl-{port}.json"
    proc = subprocess.run(
        [exe, "--quiet", "--color", "0", "--warnings", "off", "--sneaky", "--ip", "one",
         "--jsonfile", str(out), "--each-cipher", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [f for f in json.loads(out.read_text())
            if f["id"].startswith("cipher_") and "not offered" not in f["finding"]
            and f["id"] != "cipher_order"]


def _non_aead(found: list[dict[str, Any]]) -> list[str]:
    return [f["finding"] for f in found
            if not any(a in f["finding"] for a in ("GCM", "CHACHA20", "POLY1305"))]


# The listeners' TLS does not depend on the catalog: one scan (about a minute) is enough.
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_testssl_finds_only_aead_suites_on_both_listeners(
        cs: ConfigServer, procserver: ProcServer, tmp_path: Path) -> None:
    for port in (cs.site_port, procserver.port):
        found = await asyncio.to_thread(_testssl_suites, port, tmp_path)
        assert found, f"testssl listed no suite on {port}"
        assert not _non_aead(found), (port, _non_aead(found))


async def test_allow_names_only_methods_the_concrete_path_serves(
        cs: ConfigServer, http: aiohttp.ClientSession) -> None:
    """``/api/v1/certificates/agent`` is POST only: the ``GET /certificates/{serial}``
    template matches it too, but its serial pattern does not, so GET is not offered."""
    async with http.request("OPTIONS", f"{cs.url}/api/v1/certificates/agent",
                            headers=_auth(cs)) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "POST"
    async with http.get(f"{cs.url}/api/v1/certificates/agent", headers=_auth(cs)) as r:
        assert r.status == 405  # not a 404 for a serial named "agent"
        assert r.headers["Allow"] == "POST"
    async with http.get(f"{cs.url}/api/v1/certificates/zz", headers=_auth(cs)) as r:
        assert r.status == 404  # no route serves it: an unknown serial


async def test_refused_handshakes_on_the_site_listener_are_logged(cs: ConfigServer) -> None:
    """The site listener logs a refused handshake with the peer (asyncio alone says
    nothing), once per peer per interval; requests after it are served as before."""
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await _handshake(cs.site_port, _site_client_tls(cs, ciphers=CBC_ONLY))
        async with aiohttp.ClientSession() as http, \
                http.get(cs.site_url + "/healthz", ssl=_site_client_tls(cs)) as r:
            assert r.status == 200
    lines = [e for e in logs if e["event"] == "tls_handshake_rejected"]
    assert len(lines) == 1, lines
    assert (lines[0]["listener"], lines[0]["peer"]) == ("site", "127.0.0.1")
    assert lines[0]["log_level"] == "warning" and lines[0]["suppressed"] == 0


def test_the_documented_support_matrix_rules_agree_with_the_check() -> None:
    """What the OpenAPI body of POST /api/v1/machines states (``support.request_rules``)
    is what ``support.check`` accepts: schemathesis sends data valid by the schema and
    expects it accepted, and data invalid by it and expects it refused."""
    rules = Draft202012Validator(support.request_rules())
    rnd = random.Random(20261205)
    names = [a for d in support.DISTRIBUTIONS for a in d.aliases] + ["fedora", "arch"]
    versions = ["20.04", "22.04.3", "24.04", "11", "12.5", "13", "8", "9.3", "10", "022.04",
                "22.4", "7"]
    kernels = [None, "", "4.18.0-477.el8", "5.14", "5.4.0-150-generic", "5.15.0-91-generic",
               "6.1.0-18-amd64", "6.8.0", "6.12.1", "4.9", "05.015", "5.1", "7.0", "x"]
    checked = 0
    for _ in range(3000):
        doc: dict[str, object] = {"os_type": "linux", "os_name": rnd.choice(names),
                                  "os_version": rnd.choice(versions),
                                  "kernel": rnd.choice(kernels)}
        try:
            support.check("linux", str(doc["os_name"]), str(doc["os_version"]),
                          doc["kernel"] if isinstance(doc["kernel"], str) else None)
            accepted = True
        except (support.Unsupported, support.BadKernel):
            accepted = False
        assert rules.is_valid(doc) == accepted, doc
        checked += accepted
    assert checked > 100  # the sample holds both kinds
    assert not rules.is_valid({"os_type": "windows", "os_name": "windows", "os_version": "11"})
