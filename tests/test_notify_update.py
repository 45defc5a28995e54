"""Changing a notification channel in place (``PATCH /api/v1/notify/channels/{name}``,
``siterecovery notify update``): a webhook gets a new URL, severities and secret while a
notice waits in its outbox, which is kept and then delivered to the new URL signed with
the new secret; an email channel gets a login and a new SMTP server (a real one, aiosmtpd
with STARTTLS and login); refusals change nothing; and the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from configserver.rest import iso
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import run_cli
from tests.test_notify import (
    SMTP_PASSWORD,
    SMTP_USER,
    Clock,
    Mailbox,
    Receiver,
    clocked_server,
    free_port,
    heartbeat,
    self_signed,
    wait_until_api,
)

OLD_SECRET, NEW_SECRET = "old-Signing-Key-0123456789", "new-Signing-Key-9876543210"
CHANNELS = "/api/v1/notify/channels"


@pytest.fixture
async def clocked(tmp_path: Path, catalog_url: str) -> AsyncIterator[tuple[ConfigServer, Clock]]:
    """A configuration server on a clock the test moves (retries wait for it)."""
    async with clocked_server(tmp_path, catalog_url) as pair:
        yield pair


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[Receiver, str, Receiver, str]]:
    """Two webhook receivers: the old URL (answering 503) and the new one (200)."""
    old, new = Receiver(status=503), Receiver()
    app = web.Application()
    app.router.add_post("/old", old.handle)
    app.router.add_post("/new", new.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield old, f"http://127.0.0.1:{port}/old", new, f"http://127.0.0.1:{port}/new"
    finally:
        await runner.cleanup()


@pytest.fixture
async def smtp(tmp_path: Path) -> AsyncIterator[tuple[Mailbox, int, Path]]:
    """A local SMTP server that requires STARTTLS and a login (aiosmtpd, own thread)."""
    cert, key = self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    box = Mailbox(asyncio.get_running_loop())
    port = free_port()
    c = Controller(box, hostname="127.0.0.1", port=port, tls_context=ctx,
                   require_starttls=True, authenticator=box.authenticate,
                   auth_require_tls=True, server_hostname="127.0.0.1")
    await asyncio.to_thread(c.start)
    try:
        yield box, port, cert
    finally:
        await asyncio.to_thread(c.stop)


def signed_with(secret: str, headers: dict[str, str], body: dict[str, Any]) -> bool:
    raw = json.dumps(body, sort_keys=True).encode()
    ts = headers["X-Siterecovery-Timestamp"]
    want = hmac.new(secret.encode(), ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
    return headers.get("X-Siterecovery-Signature") == "sha256=" + want


async def refused(api: ApiClient, name: str, body: dict[str, Any], status: int = 422,
                  code: str | None = "invalid_channel") -> ApiCallError:
    """The PATCH is refused with ``status``/``code`` and the channel is as it was."""
    before = await api.get(f"{CHANNELS}/{name}") if status != 404 else None
    with pytest.raises(ApiCallError) as e:
        await api.patch(f"{CHANNELS}/{name}", body)
    assert e.value.status == status, e.value
    if code is not None:
        assert e.value.api_code == code, e.value
    assert e.value.hint
    if before is not None:
        assert await api.get(f"{CHANNELS}/{name}") == before
    return e.value


async def test_webhook_gets_new_url_severities_and_secret_and_keeps_its_outbox(
        clocked: tuple[ConfigServer, Clock],
        hooks: tuple[Receiver, str, Receiver, str]) -> None:
    cs, clock = clocked
    old, old_url, new, new_url = hooks
    async with ApiClient(cs.url, cs.admin_token) as api:
        made = await api.post(CHANNELS, {"name": "hook", "kind": "webhook", "url": old_url,
                                         "secret": OLD_SECRET})
        # an alert is raised; its notice fails at the old URL and waits in the outbox
        await heartbeat(cs, 0.20)
        status, headers, raised = await old.next()
        assert status == 503 and raised["event"] == "alert_raised"
        assert signed_with(OLD_SECRET, headers, raised)
        delivery = headers["X-Siterecovery-Delivery"]

        async def failed_once() -> dict[str, Any] | None:
            doc: dict[str, Any] = await api.get(f"{CHANNELS}/hook")
            return doc if doc["last_error"] else None
        before = await wait_until_api(cs, failed_once)
        assert before["pending"] == 1 and "HTTP 503" in before["last_error"]

        # refusals change nothing
        e = await refused(api, "hook", {"to": ["a@example.net"], "host": "smtp.example.net"})
        assert "to" in e.message and "host" in e.message and "webhook" in e.message
        await refused(api, "hook", {}, code=None)  # minProperties
        await refused(api, "hook", {"url": "http://:80/"})
        await refused(api, "hook", {"secret": ""}, code="invalid_secret")
        await refused(api, "nosuch", {"severities": ["critical"]}, 404, code=None)

        clock.now += 2  # the retry is 5 to 10 s after the failure: not due yet
        doc = await api.patch(f"{CHANNELS}/hook", {"url": new_url, "severities": ["critical"],
                                                   "secret": NEW_SECRET})
        assert (doc["settings"], doc["severities"], doc["has_secret"]) == (
            {"url": new_url}, ["critical"], True)
        assert doc["key_id"] and doc["key_id"] == made["key_id"]  # the same secrets key
        assert (doc["pending"], doc["last_error"]) == (1, before["last_error"])  # kept
        assert (doc["created"], doc["updated"]) == (made["created"], iso(clock.now))
        assert NEW_SECRET not in json.dumps(doc) and OLD_SECRET not in json.dumps(doc)
        assert await api.get(f"{CHANNELS}/hook") == doc

        # a test notice goes to the new URL, signed with the new secret
        assert (await api.post(f"{CHANNELS}/hook/test"))["delivered"] is True
        _status, headers, body = await new.next()
        assert body["event"] == "test"
        assert signed_with(NEW_SECRET, headers, body)
        assert not signed_with(OLD_SECRET, headers, body)
        # and so does the waiting notice, when its retry is due (well before the process
        # server's heartbeat is missed)
        clock.now += 60
        await cs.notifier.notify()
        _status, headers, body = await new.next()
        assert (headers["X-Siterecovery-Delivery"], body["event"], body["code"]) == (
            delivery, "alert_raised", raised["code"])
        assert signed_with(NEW_SECRET, headers, body)

        async def delivered() -> dict[str, Any] | None:
            doc: dict[str, Any] = await api.get(f"{CHANNELS}/hook")
            return doc if doc["delivered"] == 1 else None
        assert (await wait_until_api(cs, delivered))["pending"] == 0
    assert old.got.empty() and new.got.empty()


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_email_gets_a_login_and_a_new_server(
        cs: ConfigServer, api: ApiClient, smtp: tuple[Mailbox, int, Path]) -> None:
    box, port, ca = smtp
    await api.post(CHANNELS, {"name": "oncall", "kind": "email", "to": ["a@example.net"],
                              "from": "sr@example.net", "host": "smtp.example.invalid"})
    e = await refused(api, "oncall", {"username": SMTP_USER})  # no secret at all
    assert "password" in e.message
    e = await refused(api, "oncall", {"url": "http://127.0.0.1/hook"})
    assert "url" in e.message and "email" in e.message
    doc = await api.patch(f"{CHANNELS}/oncall", {"username": SMTP_USER,
                                                 "secret": SMTP_PASSWORD})
    assert doc["has_secret"] and doc["settings"]["username"] == SMTP_USER
    assert SMTP_PASSWORD not in json.dumps(doc)
    # the stored password counts: the login stays valid while the server changes
    doc = await api.patch(f"{CHANNELS}/oncall", {"host": "127.0.0.1", "port": port,
                                                 "ca_file": str(ca),
                                                 "to": ["oncall@example.net"]})
    assert doc["settings"] == {"to": ["oncall@example.net"], "from": "sr@example.net",
                               "host": "127.0.0.1", "port": port, "starttls": True,
                               "username": SMTP_USER, "ca_file": str(ca)}
    await refused(api, "oncall", {"starttls": False})  # a login needs STARTTLS
    assert (await api.post(f"{CHANNELS}/oncall/test"))["delivered"] is True
    tls, login, rcpt, mail = await box.next()
    assert (tls, login, rcpt) == (True, SMTP_USER, ["oncall@example.net"])
    assert mail["Subject"] == "[siterecovery critical] test: notify_test oncall"

    # null removes: the password alone is refused (the login stays), the login with it
    # is removed, and the next mail goes without one
    e = await refused(api, "oncall", {"secret": None})
    assert "needs the password" in e.message and "--no-username" in e.hint
    doc = await api.patch(f"{CHANNELS}/oncall", {"username": None, "secret": None})
    assert not doc["has_secret"] and doc["key_id"] is None
    assert "username" not in doc["settings"] and doc["settings"]["ca_file"] == str(ca)
    assert (await api.post(f"{CHANNELS}/oncall/test"))["delivered"] is True
    tls, login, rcpt, mail = await box.next()
    assert (tls, login, rcpt) == (True, "", ["oncall@example.net"])  # no login
    doc = await api.patch(f"{CHANNELS}/oncall", {"ca_file": None})
    assert doc["settings"] == {"to": ["oncall@example.net"], "from": "sr@example.net",
                               "host": "127.0.0.1", "port": port, "starttls": True}


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_cli_update(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    await api.post(CHANNELS, {"name": "ops", "kind": "webhook",
                              "url": "http://127.0.0.1:9/old"})
    key = tmp_path / "hook.key"
    key.write_text(NEW_SECRET + "\n")
    # nothing to change: refused before any call (this token file does not exist)
    r = await asyncio.to_thread(run_cli, "notify", "update", "ops", "--api", cs.url,
                                "--token-file", str(tmp_path / "absent"))
    assert r.returncode == 2 and "nothing to change" in r.stderr, (r.stdout, r.stderr)
    r = await asyncio.to_thread(run_cli, "notify", "update", "ops", "--webhook",
                                "http://127.0.0.1:9/new", "--severity", "warning",
                                "--secret-file", str(key), "--api", cs.url,
                                "--token-file", str(cs.cfg.token_path))
    assert r.returncode == 0, r.stderr
    assert "url:        http://127.0.0.1:9/new" in r.stdout
    assert "signed:     yes" in r.stdout and NEW_SECRET not in r.stdout
    doc = await api.get(f"{CHANNELS}/ops")
    assert (doc["settings"], doc["severities"], doc["has_secret"]) == (
        {"url": "http://127.0.0.1:9/new"}, ["warning"], True)
    # removed: unsigned from now on; removing and giving it at once is refused by the CLI
    r = await asyncio.to_thread(run_cli, "notify", "update", "ops", "--no-secret",
                                "--secret-file", str(key), "--api", cs.url,
                                "--token-file", str(tmp_path / "absent"))
    assert r.returncode == 2 and "contradict" in r.stderr, (r.stdout, r.stderr)
    r = await asyncio.to_thread(run_cli, "notify", "update", "ops", "--no-secret",
                                "--api", cs.url, "--token-file", str(cs.cfg.token_path))
    assert r.returncode == 0, r.stderr
    assert "signed:     no" in r.stdout
    assert (await api.get(f"{CHANNELS}/ops"))["has_secret"] is False
