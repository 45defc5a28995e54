"""Notification channels: alert raise/clear notices reach a real HTTP receiver (signed
JSON) and a real SMTP server (aiosmtpd, STARTTLS and login required), per severity, through
the durable outbox — on SQLite and PostgreSQL; and through the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import run_cli
from tests.test_procservers import beat, post_beat

HOOK_SECRET = "hook-Signing-Key-0123456789"
SMTP_USER, SMTP_PASSWORD = "alerts@example.net", "smtp-Pass-word-42"
CACHE = "procserver_cache_free_low"
T0 = float(int(time.time()))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Receiver:
    """A webhook receiver: records every request; answers ``status``."""

    status: int = 200
    got: asyncio.Queue[tuple[int, dict[str, str], bytes]] = field(
        default_factory=asyncio.Queue)

    async def handle(self, request: web.Request) -> web.Response:
        await self.got.put((self.status, dict(request.headers), await request.read()))
        return web.Response(status=self.status)

    async def next(self) -> tuple[int, dict[str, str], dict[str, Any]]:
        async with asyncio.timeout(30):
            status, headers, body = await self.got.get()
        return status, headers, json.loads(body)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield r, f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


def self_signed(d: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtp.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = d / "smtp.pem", d / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Mailbox:
    """What the SMTP server accepted: (TLS in use, authenticated login, envelope, message)."""

    loop: asyncio.AbstractEventLoop
    got: asyncio.Queue[tuple[bool, str, list[str], bytes]] = field(
        default_factory=asyncio.Queue)
    logins: list[tuple[str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        login = session.auth_data.decode() if isinstance(session.auth_data, bytes) else ""
        item = (session.ssl is not None, login, list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""))
        self.loop.call_soon_threadsafe(self.got.put_nowait, item)
        return "250 OK"

    def authenticate(self, server: Any, session: Session, envelope: Envelope,
                     mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        ok = (data.login.decode(), data.password.decode()) == (SMTP_USER, SMTP_PASSWORD)
        with self.lock:
            self.logins.append((data.login.decode(), ok))
        return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)

    async def next(self) -> tuple[bool, str, list[str], Any]:
        async with asyncio.timeout(30):
            tls, login, rcpt, raw = await self.got.get()
        return tls, login, rcpt, message_from_bytes(raw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[tuple[Mailbox, int, Path]]:
    """A local SMTP server that requires STARTTLS and a login (aiosmtpd, own thread)."""
    cert, key = self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    box = Mailbox(asyncio.get_event_loop())
    port = free_port()
    c = Controller(box, hostname="127.0.0.1", port=port, tls_context=ctx,
                   require_starttls=True, authenticator=box.authenticate,
                   auth_require_tls=True, server_hostname="127.0.0.1")
    c.start()
    try:
        yield box, port, cert
    finally:
        c.stop()


@pytest.fixture
async def aged(tmp_path: Path, catalog_url: str) -> AsyncIterator[tuple[ConfigServer, Clock]]:
    async with clocked_server(tmp_path, catalog_url) as pair:
        yield pair


@asynccontextmanager
async def clocked_server(tmp_path: Path, catalog_url: str
                         ) -> AsyncIterator[tuple[ConfigServer, Clock]]:
    """A configuration server on a clock the test moves (its alerts evaluated hourly
    unless a heartbeat or the test asks)."""
    clock = Clock()
    cs = ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0,
                                         site_port=0, database_url=catalog_url,
                                         alert_interval_seconds=3600), clock=clock)
    await cs.start()
    try:
        yield cs, clock
    finally:
        await cs.stop()


async def heartbeat(cs: ConfigServer, ratio: float) -> None:
    status, body = await post_beat(cs, beat(cache_free_ratio=ratio))  # evaluates at once
    assert status == 200, body


async def notices_sent(cs: ConfigServer) -> dict[tuple[str, str], float]:
    """siterecovery_configserver_notifications_total by (kind, result), from /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"{cs.url}/metrics") as r:
        text = await r.text()
    return {(s.labels["kind"], s.labels["result"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "siterecovery_configserver_notifications_total"}


def check_signature(headers: dict[str, str], body: dict[str, Any]) -> None:
    raw = json.dumps(body, sort_keys=True).encode()
    ts = headers["X-Siterecovery-Timestamp"]
    want = hmac.new(HOOK_SECRET.encode(), ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
    assert headers["X-Siterecovery-Signature"] == "sha256=" + want


async def test_alerts_reach_webhook_and_mail_by_severity(
        aged: tuple[ConfigServer, Clock], receiver: tuple[Receiver, str],
        smtp: tuple[Mailbox, int, Path]) -> None:
    cs, clock = aged
    hook, url = receiver
    box, port, ca = smtp
    async with ApiClient(cs.url, cs.admin_token) as api:
        made = await api.post("/api/v1/notify/channels", {
            "name": "hook", "kind": "webhook", "url": url, "secret": HOOK_SECRET})
        assert made["has_secret"] and made["severities"] == ["critical", "warning"]
        assert HOOK_SECRET not in json.dumps(made)
        await api.post("/api/v1/notify/channels", {
            "name": "oncall", "kind": "email", "severities": ["critical"],
            "to": ["oncall@example.net"], "from": "siterecovery@example.net",
            "host": "127.0.0.1", "port": port, "username": SMTP_USER,
            "secret": SMTP_PASSWORD, "ca_file": str(ca)})
        # warning: the webhook only
        await heartbeat(cs, 0.29)
        _status, headers, body = await hook.next()
        assert (body["event"], body["code"], body["severity"], body["target"]) == (
            "alert_raised", CACHE, "warning", "ps1")
        assert headers["X-Siterecovery-Event"] == "alert_raised"
        check_signature(headers, body)
        first_delivery = headers["X-Siterecovery-Delivery"]
        # critical: the warning clears, the critical one is raised: both channels
        clock.now += 10
        await heartbeat(cs, 0.24)
        seen = {(b["event"], b["severity"]) for _s, _h, b in [await hook.next(),
                                                            await hook.next()]}
        assert seen == {("alert_cleared", "warning"), ("alert_raised", "critical")}
        tls, login, rcpt, mail = await box.next()
        assert (tls, login, rcpt) == (True, SMTP_USER, ["oncall@example.net"])
        assert mail["Subject"] == f"[siterecovery critical] RAISED: {CACHE} ps1"
        assert "cache free 24%" in mail.get_payload()
        # back to normal: the critical one clears on both
        clock.now += 10
        await heartbeat(cs, 0.9)
        _s, _h, body = await hook.next()
        assert (body["event"], body["severity"]) == ("alert_cleared", "critical")
        _tls, _login, _rcpt, mail = await box.next()
        assert mail["Subject"] == f"[siterecovery critical] cleared: {CACHE} ps1"
        assert hook.got.empty() and box.got.empty()
        assert all(ok for _u, ok in box.logins)

        async def settled() -> dict[str, Any] | None:
            docs = {c["name"]: c for c in (await api.get("/api/v1/notify/channels"))["channels"]}
            return docs if all(c["pending"] == 0 for c in docs.values()) else None
        docs = await wait_until_api(cs, settled)
        assert (docs["hook"]["delivered"], docs["oncall"]["delivered"]) == (4, 2)
        assert await notices_sent(cs) == {("webhook", "delivered"): 4,
                                          ("email", "delivered"): 2}
        assert first_delivery.isdigit()
        # the test route sends now, and says so
        assert (await api.post("/api/v1/notify/channels/oncall/test")) == {
            "channel": "oncall", "delivered": True, "error": None}
        _tls, _login, _rcpt, mail = await box.next()
        assert mail["Subject"] == "[siterecovery critical] test: notify_test oncall"


async def wait_until_api(cs: ConfigServer, check: Any) -> Any:
    """Re-check after each change the server announces, and at least every 0.5 s (delivery
    marks rows without announcing it)."""
    async with asyncio.timeout(30):
        while (got := await check()) is None:
            await cs.notifier.wait(0.5)
        return got


async def test_undelivered_notice_survives_a_restart_and_keeps_its_delivery_id(
        tmp_path: Path, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    hook.status = 503  # the receiver is down
    clock = Clock()
    cfg = ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0,
                             database_url=f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}",
                             alert_interval_seconds=3600)
    cs = ConfigServer(cfg, clock=clock)
    await cs.start()
    try:
        async with ApiClient(cs.url, cs.admin_token) as api:
            await api.post("/api/v1/notify/channels", {"name": "hook", "kind": "webhook",
                                                       "url": url})
        await heartbeat(cs, 0.20)
        status, headers, body = await hook.next()
        assert status == 503 and body["event"] == "alert_raised"
        delivery = headers["X-Siterecovery-Delivery"]
        assert "X-Siterecovery-Signature" not in headers  # no secret, no signature

        async def failed_once() -> dict[str, Any] | None:
            async with ApiClient(cs.url, cs.admin_token) as api:
                doc: dict[str, Any] = await api.get("/api/v1/notify/channels/hook")
            return doc if doc["last_error"] else None
        doc = await wait_until_api(cs, failed_once)
        assert doc["pending"] == 1 and "HTTP 503" in doc["last_error"]
        assert await notices_sent(cs) == {("webhook", "failed"): 1}
    finally:
        await cs.stop()
    hook.status = 200
    clock.now += 3600  # past the retry's back-off
    cs = ConfigServer(cfg, clock=clock)
    await cs.start()  # the worker's first pass finds the pending notice
    try:
        status, headers, body = await hook.next()
        assert (status, headers["X-Siterecovery-Delivery"], body["event"], body["code"]) == (
            200, delivery, "alert_raised", CACHE)
    finally:
        await cs.stop()
    assert hook.got.empty()  # the alert still holds: no second notice


async def test_channel_refusals(cs: ConfigServer, api: ApiClient) -> None:
    async def refused(body: dict[str, Any], code: str) -> ApiCallError:
        with pytest.raises(ApiCallError) as e:
            await api.post("/api/v1/notify/channels", body)
        assert (e.value.status, e.value.api_code) == (422, code), e.value
        assert e.value.hint
        return e.value

    mail = {"name": "m", "kind": "email", "to": ["a@example.net"], "from": "b@example.net",
            "host": "smtp.example.net"}
    await refused({**mail, "username": "u"}, "invalid_channel")
    await refused({**mail, "username": "u", "secret": "pw", "starttls": False},
                  "invalid_channel")
    await refused({**mail, "ca_file": "/nonexistent/ca.pem"}, "invalid_channel")
    e = await refused({"name": "h", "kind": "webhook", "url": "http://x/", "secret": 12345},
                      "invalid_secret")
    assert "12345" not in e.message
    await api.post("/api/v1/notify/channels", {"name": "h", "kind": "webhook",
                                               "url": "http://127.0.0.1:9/"})
    with pytest.raises(ApiCallError) as e2:
        await api.post("/api/v1/notify/channels", {"name": "h", "kind": "webhook",
                                                   "url": "http://127.0.0.1:9/"})
    assert e2.value.status == 409
    tested = await api.post("/api/v1/notify/channels/h/test")
    assert tested["delivered"] is False and "unreachable" in tested["error"]
    # a webhook URL's path may hold a token: errors (logged, listed) name its origin only
    await api.post("/api/v1/notify/channels", {"name": "tok", "kind": "webhook",
                                               "url": "http://127.0.0.1:9/T0KEN/secret"})
    tested = await api.post("/api/v1/notify/channels/tok/test")
    assert "http://127.0.0.1:9 " in tested["error"] and "T0KEN" not in tested["error"]


# The CLI is the same over either catalog (the API tests run on both): SQLite only.
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_cli_add_list_test_remove(cs: ConfigServer, receiver: tuple[Receiver, str],
                                        tmp_path: Path) -> None:
    hook, url = receiver
    key = tmp_path / "hook.key"
    key.write_text(HOOK_SECRET + "\n")
    api = ["--api", cs.url, "--token-file", str(cs.cfg.token_path)]

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_cli, *args, *api)

    r = await cli("notify", "add", "ops", "--webhook", url, "--secret-file", str(key),
                  "--severity", "critical")
    assert r.returncode == 0, r.stderr
    assert "signed:     yes" in r.stdout and HOOK_SECRET not in r.stdout
    r = await cli("notify", "list", "--json")
    (doc,) = json.loads(r.stdout)["channels"]
    assert (doc["name"], doc["severities"], doc["settings"]) == ("ops", ["critical"],
                                                                 {"url": url})
    r = await cli("notify", "test", "ops")
    assert r.returncode == 0 and "accepted" in r.stdout, r.stderr
    _status, headers, body = await hook.next()
    assert body["event"] == "test"
    check_signature(headers, body)
    hook.status = 500
    r = await cli("notify", "test", "ops", "--json")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["error"].endswith("HTTP 500")
    r = await cli("notify", "add", "bad", "--email", "a@example.net")
    assert r.returncode == 2 and "--smtp-host" in r.stderr
    r = await cli("notify", "remove", "ops")
    assert r.returncode == 0, r.stderr
    r = await cli("notify", "show", "ops")
    assert r.returncode == 2 and "siterecovery notify list" in r.stderr
