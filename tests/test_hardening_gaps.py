"""Issue #12, what its first tests left open, on one configuration server (SQLite):

- item 10: every 405 names the methods its path has (``Allow``), on every route of both
  listeners and on the paths outside the route table (``/openapi.json``, the console);
- item 3: a process server whose uploads have failed past ``storage_alert_seconds`` shows
  in ``procserver list`` with its health turned, and in ``alerts list`` with the error
  named; the next heartbeat that reports success clears both;
- item 4: a process server whose own certificate is revoked says so in its log at error
  level, once a minute at most, and says when a new certificate lifts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import structlog
import structlog.testing

from configserver.api import all_routes
from configserver.server import ConfigServer
from procserver.csclient import ConfigServerClient
from procserver.trust import TrustList
from siterecovery.apiclient import ApiClient
from siterecovery.cli import main
from tests.managedsite import issue_procserver_cert
from tests.sitehelpers import sqlite_configserver
from tests.test_procservers import beat, post_beat
from wire.protocol import ProtocolError

pytestmark = pytest.mark.asyncio(loop_scope="module")

# A concrete value for each path parameter of the route table (each matches its pattern).
PARAMS = {"name": "m1", "machine": "m1", "serial": "ab12",
          "id": "0123abcd-0123-4abc-8def-0123456789ab"}
ENOSPC = "OSError: [Errno 28] No space left on device: 'packs/3f/3f00'"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ConfigServer]:
    d: Path = tmp_path_factory.mktemp("hardening-gaps")
    async with sqlite_configserver(d, site_port=0) as server:
        yield server


def _allow(r: aiohttp.ClientResponse) -> set[str]:
    return {m.strip() for m in r.headers.get("Allow", "").split(",") if m.strip()}


def _concrete(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PARAMS[m.group(1)], template)


async def test_every_405_names_the_methods_its_path_serves(cs: ConfigServer) -> None:
    """OPTIONS is served nowhere: each path of the route table answers 405 with exactly
    the methods its routes have, on the listener that serves it; /openapi.json and the
    console's public pages (routed outside the table) name theirs too, never an empty
    ``Allow``."""
    served: dict[tuple[str, str], set[str]] = defaultdict(set)
    for route in all_routes():
        for listener in route.listeners:
            served[(listener, route.path)].add(route.method)
    assert len(served) > 50
    site_tls = ssl.create_default_context(cafile=str(cs.ca.cert_path))
    auth = {"Authorization": f"Bearer {cs.admin_token}"}
    base = {"admin": cs.url, "site": cs.site_url}
    wrong: list[tuple[str, str, int, set[str], set[str]]] = []
    async with aiohttp.ClientSession() as http:
        for (listener, template), methods in sorted(served.items()):
            tls: dict[str, Any] = {"ssl": site_tls} if listener == "site" else {}
            async with http.options(base[listener] + _concrete(template), headers=auth,
                                    **tls) as r:
                if r.status != 405 or _allow(r) != methods:
                    wrong.append((listener, template, r.status, _allow(r), methods))
        outside = {"/openapi.json": {"GET", "HEAD"},
                   "/console/signin": {"GET", "HEAD", "POST"},
                   "/console/static/console.css": {"GET", "HEAD"}}
        for path, methods in outside.items():
            async with http.put(cs.url + path, headers=auth) as r:
                if r.status != 405 or _allow(r) != methods:
                    wrong.append(("admin", path, r.status, _allow(r), methods))
                if r.status == 405:
                    assert (await r.json())["error"]["code"] == "method_not_allowed"
    assert wrong == [], wrong


def _row(out: str, name: str) -> list[str]:
    """The table row of ``name`` in the CLI's output (the server's log lines, on the same
    captured stdout, begin with their time)."""
    [row] = [line.split() for line in out.splitlines() if line.split()[:1] == [name]]
    return row


async def _cli(cs: ConfigServer, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The CLI run in-process (in a thread: it has its own event loop); its output."""
    capsys.readouterr()
    saved = structlog.get_config()  # the CLI configures logging onto the captured stdout
    try:
        rc = await asyncio.to_thread(main, [*args, "--api", cs.url, "--token-file",
                                            str(cs.cfg.token_path)])
    finally:
        structlog.configure(**saved)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


async def test_failing_storage_shows_in_procserver_list_and_alerts_list(
        cs: ConfigServer, capsys: pytest.CaptureFixture[str]) -> None:
    """What an operator sees of a vault that has refused uploads for 400 s (past the
    default 300 s): ``procserver list`` no longer says ``normal``, ``procserver show`` and
    ``alerts list`` name the error; the heartbeat that reports success clears them."""
    status, body = await post_beat(cs, beat("ps-full", storage_failing_seconds=400.0,
                                            storage_error=ENOSPC))
    assert status == 200, body
    assert _row(await _cli(cs, capsys, "procserver", "list"), "ps-full")[3] == "warning"
    shown = await _cli(cs, capsys, "procserver", "show", "ps-full")
    assert "procserver_storage_failing" in shown and ENOSPC in shown, shown
    alerts = await _cli(cs, capsys, "alerts", "list")
    assert "procserver_storage_failing" in alerts and "ps-full" in alerts, alerts

    status, body = await post_beat(cs, beat("ps-full", storage_failing_seconds=0.0,
                                            storage_error=None))
    assert status == 200, body
    assert _row(await _cli(cs, capsys, "procserver", "list"), "ps-full")[3] == "normal"
    assert "procserver_storage_failing" not in await _cli(cs, capsys, "alerts", "list")


async def test_a_revoked_process_server_says_so_loudly(cs: ConfigServer,
                                                       tmp_path: Path) -> None:
    """Item 4: a process server whose own certificate is revoked logs it at error level,
    with the serial and the way to a new certificate, as soon as its trust list says so
    (not only at the next session), then refuses sessions, each refusal logged at most once
    a minute; a new certificate in its files lifts it, logged too."""
    async with ApiClient(cs.url, cs.admin_token) as api:
        issued = await issue_procserver_cert(api, tmp_path / "tls", name="ps-revoked")
        client = ConfigServerClient(cs.url, str(cs.cfg.internal_token_path),
                                    str(cs.ca.cert_path))
        trust = TrustList(client, tmp_path, str(tmp_path / "tls" / "ca.pem"),
                          str(tmp_path / "tls" / "server.pem"))
        running = asyncio.create_task(trust.run())
        try:
            await trust.wait_until(lambda t: t.version is not None)
            assert not trust.own_revoked
            with structlog.testing.capture_logs() as logs:
                await api.post(f"/api/v1/certificates/{issued.serial}/revoke")
                await trust.wait_until(lambda t: t.own_revoked)
                loud = [e for e in logs if e["log_level"] == "error"]
                assert [(e["event"], e["serial"]) for e in loud] == [
                    ("certificate_revoked", issued.serial)], logs
                assert "refuses every agent" in loud[0]["hint"]
                assert "siterecovery cert procserver" in loud[0]["hint"]
                for _ in range(3):
                    with pytest.raises(ProtocolError) as e:
                        await trust.authorize("web01", {"serialNumber": "ab12"})
                    assert e.value.code == "server_certificate_revoked"
                assert len([e for e in logs if e["log_level"] == "error"]) == 1

                await issue_procserver_cert(api, tmp_path / "tls", name="ps-revoked")
                with pytest.raises(ProtocolError) as e:  # not revoked: the agent's own check
                    await trust.authorize("web01", {"serialNumber": "ab12"})
                assert e.value.code != "server_certificate_revoked"
                assert not trust.own_revoked
            assert [e["event"] for e in logs].count("certificate_revocation_lifted") == 1
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await client.close()
