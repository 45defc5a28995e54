"""Process servers: registration by heartbeat, health, refresh, removal — through the real
HTTP API, the CLI, and real process servers heartbeating to a real configuration server."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import structlog.testing

from configserver.server import ConfigServer
from procserver import db as psdb
from procserver.config import ProcServerConfig
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    proc_config,
    run_cli,
    running_procserver,
)

T = TypeVar("T")


def beat(name: str = "ps1", **kw: Any) -> dict[str, Any]:
    """A heartbeat body as a process server sends it."""
    doc: dict[str, Any] = {
        "name": name, "address": "10.0.0.5:9443", "version": "0.1.0", "cache_bytes": 1 << 20,
        "cache_free_ratio": 0.9, "backlog_bytes": 0, "backlog_seconds": 0.0,
        "throughput_bps": 1000.0, "sessions": 2}
    doc.update(kw)
    return doc


async def post_beat(cs: ConfigServer, doc: Any, token: str | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(
            f"{cs.url}/api/v1/internal/procservers/heartbeat",
            data=doc if isinstance(doc, str) else json.dumps(doc),
            headers={"Authorization": f"Bearer {token or cs.internal_token}",
                     "Content-Type": "application/json"}) as r:
        return r.status, await r.json()


async def metrics_text(cs: ConfigServer) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{cs.url}/metrics") as r:
        assert r.status == 200
        return await r.text()


async def wait_until(cs: ConfigServer, check: Callable[[], Awaitable[T | None]],
                     timeout: float = 30) -> T:
    """Re-check after every change the server announces (``server.notify()``) until
    ``check`` returns something; checking under the condition's lock misses no notice."""
    async with asyncio.timeout(timeout), cs.changed:
        while (result := await check()) is None:
            await cs.changed.wait()
        return result


async def test_first_heartbeat_registers_and_later_ones_update(cs: ConfigServer,
                                                               api: ApiClient) -> None:
    assert (await api.get("/api/v1/procservers")) == {"procservers": []}
    assert await post_beat(cs, beat()) == (200, {"refresh_requested": False})
    doc = await api.get("/api/v1/procservers/ps1")
    assert {k: doc[k] for k in beat()} == beat()
    assert doc["health"] == "normal" and doc["alerts"] == [] and doc["machines"] == 0
    assert doc["registered_at"] == doc["last_contact"]
    assert doc["registered_at"].endswith("Z") and doc["seconds_since_contact"] < 60
    await post_beat(cs, beat(sessions=7, cache_bytes=5, address="10.0.0.6:9443"))
    again = await api.get("/api/v1/procservers/ps1")
    assert (again["sessions"], again["cache_bytes"], again["address"]) == (7, 5, "10.0.0.6:9443")
    assert again["registered_at"] == doc["registered_at"]
    await post_beat(cs, beat("ps2"))
    names = [p["name"] for p in (await api.get("/api/v1/procservers"))["procservers"]]
    assert names == ["ps1", "ps2"]


async def test_heartbeat_needs_the_internal_token_and_valid_input(cs: ConfigServer,
                                                                  api: ApiClient) -> None:
    status, body = await post_beat(cs, beat(), token=cs.admin_token)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    bad: list[Any] = [
        beat(cache_free_ratio=1.5), beat(cache_free_ratio=-0.1), beat(sessions=-1),
        beat(backlog_seconds=-1), beat(name="../etc"), beat(name=""), beat(address=""),
        beat(address="a b"), beat(version="x" * 41), beat(cache_bytes="big"),
        beat(extra=1), {k: v for k, v in beat().items() if k != "cache_free_ratio"},
        json.dumps(beat()).replace("1000.0", "NaN"), "not json", "[]",
    ]
    for doc in bad:
        status, body = await post_beat(cs, doc)
        assert 400 <= status < 500 and status != 401, (doc, status)
        assert body["error"]["code"] in ("invalid_request", "bad_json")
        assert body["error"]["message"] and body["error"]["hint"] is not None
    # Nothing was registered by any of them.
    assert (await api.get("/api/v1/procservers")) == {"procservers": []}
    try:
        await api.get("/api/v1/procservers/ps1")
        raise AssertionError("unreachable")
    except ApiCallError as e:
        assert (e.status, e.api_code) == (404, "procserver_not_found")
        assert "heartbeat" in e.hint


async def test_heartbeat_is_served_on_the_site_listener_too(cs: ConfigServer,
                                                            api: ApiClient) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=str(cs.cfg.ca_dir / "ca.pem"))
    async with aiohttp.ClientSession() as http, http.post(
            f"{cs.site_url}/api/v1/internal/procservers/heartbeat", json=beat("siteps"),
            headers={"Authorization": f"Bearer {cs.internal_token}"}, ssl=ctx) as r:
        assert r.status == 200
    assert (await api.get("/api/v1/procservers/siteps"))["address"] == "10.0.0.5:9443"


async def test_refresh_is_answered_once_by_the_next_heartbeat(cs: ConfigServer,
                                                              api: ApiClient) -> None:
    try:
        await api.post("/api/v1/procservers/nope/refresh")
        raise AssertionError("unreachable")
    except ApiCallError as e:
        assert (e.status, e.api_code) == (404, "procserver_not_found")
    assert (await api.get("/api/v1/procservers")) == {"procservers": []}  # not created
    await post_beat(cs, beat())
    doc = await api.post("/api/v1/procservers/ps1/refresh")
    assert doc["refresh_requested"] is True and doc["name"] == "ps1"
    assert (await api.get("/api/v1/procservers/ps1"))["refresh_requested"] is True
    assert await post_beat(cs, beat()) == (200, {"refresh_requested": True})
    assert await post_beat(cs, beat()) == (200, {"refresh_requested": False})
    assert (await api.get("/api/v1/procservers/ps1"))["refresh_requested"] is False


async def test_remove_refuses_while_machines_are_assigned(cs: ConfigServer,
                                                          api: ApiClient) -> None:
    await post_beat(cs, beat())
    await post_beat(cs, beat(cache_free_ratio=0.1))  # an active alert about ps1
    await api.post("/api/v1/machines", {"name": "web01", "ip": "10.0.0.10", "os_type": "linux",
                                        "os_name": "ubuntu", "os_version": "22.04",
                                        "process_server": "ps1"})
    assert (await api.get("/api/v1/procservers/ps1"))["machines"] == 1
    try:
        await api.delete("/api/v1/procservers/ps1")
        raise AssertionError("unreachable")
    except ApiCallError as e:
        assert (e.status, e.api_code) == (409, "procserver_in_use")
        assert "web01" in e.message and "process_server" in e.hint
    doc = await api.get("/api/v1/procservers/ps1")  # nothing changed
    assert doc["machines"] == 1 and doc["health"] == "critical"
    await api.patch("/api/v1/machines/web01", {"process_server": None})
    await api.delete("/api/v1/procservers/ps1")
    try:
        await api.delete("/api/v1/procservers/ps1")
        raise AssertionError("unreachable")
    except ApiCallError as e:
        assert (e.status, e.api_code) == (404, "procserver_not_found")
    assert (await api.get("/api/v1/procservers")) == {"procservers": []}
    # Its alert is cleared, not left active about a server that is gone.
    assert (await api.get("/api/v1/events", active=True, target="ps1"))["events"] == []
    cleared = (await api.get("/api/v1/events", target="ps1"))["events"]
    assert [(e["code"], e["active"]) for e in cleared] == [("procserver_cache_free_low", False)]
    assert 'procserver="ps1"' not in await metrics_text(cs)


# -- real process servers ---------------------------------------------------------------


def _ps_config(tmp: Path, pki: Pki, cs: ConfigServer, vault: tuple[str, Path],
               **kw: Any) -> ProcServerConfig:
    url, key = vault
    return proc_config(tmp, pki, url, key, configserver_url=cs.url,
                       configserver_token_file=str(cs.cfg.internal_token_path), **kw)


async def _registered(api: ApiClient, name: str, **want: Any) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = await api.get(f"/api/v1/procservers/{name}")
    except ApiCallError:
        return None
    return doc if all(doc[k] == v for k, v in want.items()) else None


async def _heartbeats(api: ApiClient, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{api.base_url}/metrics") as r:
        text = await r.text()
    prefix = f'siterecovery_configserver_procserver_heartbeats_total{{procserver="{name}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


async def test_a_real_process_server_registers_and_heartbeats(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path], cs: ConfigServer,
        api: ApiClient) -> None:
    cfg = _ps_config(tmp_path, pki, cs, vault_at, name="ps-real",
                     heartbeat_interval_seconds=3600, segment_bytes=1 << 20,
                     cache_quota_bytes=16 << 20)
    async with running_procserver(cfg) as ps:
        doc = await wait_until(cs, lambda: _registered(api, "ps-real"))
        assert doc["address"] == f"127.0.0.1:{ps.port}"
        assert doc["version"] and doc["version"] != "unknown"
        assert (doc["cache_bytes"], doc["cache_free_ratio"]) == (0, 1.0)
        assert (doc["backlog_bytes"], doc["backlog_seconds"], doc["sessions"]) == (0, 0, 0)
        assert doc["health"] == "normal"
        assert await _heartbeats(api, "ps-real") == 1
        # Refresh: the flag waits for the next heartbeat (an hour away here: the test
        # lets that hour pass at once); the answer makes the process server heartbeat
        # again at once, so two arrive and the second finds the flag cleared.
        await api.post("/api/v1/procservers/ps-real/refresh")
        ps.reporter.beat()
        await wait_until(cs, lambda: _registered(api, "ps-real", refresh_requested=False))
        await wait_until(cs, lambda: _count_at_least(api, "ps-real", 3))
        assert await _heartbeats(api, "ps-real") == 3
        # A point uploaded between two heartbeats shows as upload throughput; once it is
        # in the vault nothing is left waiting.
        disk = tmp_path / "disk.img"
        disk.write_bytes(random.Random(5).randbytes(2 << 20))
        agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
        try:
            r = await agent.replicate_once()
        finally:
            agent.close()
        await ps.wait_point(r.cycle)
        ps.reporter.beat()
        await wait_until(cs, lambda: _count_at_least(api, "ps-real", 4))
        doc = await api.get("/api/v1/procservers/ps-real")
        assert doc["throughput_bps"] > 0
        assert (doc["cache_bytes"], doc["backlog_bytes"], doc["backlog_seconds"]) == (0, 0, 0)


async def test_a_refused_point_report_does_not_hold_up_the_others(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path], cs: ConfigServer,
        api: ApiClient) -> None:
    cfg = _ps_config(tmp_path, pki, cs, vault_at, name="ps-out",
                     heartbeat_interval_seconds=3600)
    async with running_procserver(cfg) as ps:
        await wait_until(cs, lambda: _registered(api, "ps-out"))
        # First in the outbox: a report the catalog refuses whatever happens (422).
        bad = "0" * 64
        async with ps.sessionmaker() as s:
            s.add(psdb.PointReport(point_id=bad, machine="web01", reported=False,
                                   doc=json.dumps({"id": bad, "machine": "web01",
                                                   "consistency": "sorta"})))
            await s.commit()
        disk = tmp_path / "disk.img"
        disk.write_bytes(random.Random(6).randbytes(1 << 20))
        agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
        with structlog.testing.capture_logs() as logs:
            try:
                r = await agent.replicate_once()
            finally:
                agent.close()
            good = await ps.wait_point(r.cycle)

            async def listed() -> list[str] | None:
                doc = await api.get("/api/v1/points", machine="web01")
                ids = [p["id"] for p in doc["points"]]
                return ids if good in ids else None

            assert await wait_until(cs, listed) == [good]  # the one behind it got through
        refused = [e for e in logs if e["event"] == "point_report_refused"]
        assert [(e["point"], e["status"]) for e in refused] == [(bad, 422)]
        async with ps.sessionmaker() as s:
            row = await s.get_one(psdb.PointReport, bad)
            assert not row.reported  # parked, not lost: a refresh or a restart retries it


async def _count_at_least(api: ApiClient, name: str, n: int) -> float | None:
    c = await _heartbeats(api, name)
    return c if c >= n else None


async def test_a_stalled_upload_shows_as_backlog_and_cache_alerts(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path], cs: ConfigServer,
        api: ApiClient) -> None:
    """The vault hangs on pack uploads: the acknowledged cycle stays in the cache, and
    the process server's own heartbeats say so (backlog, cache free below 25%)."""
    url, key = vault_at
    cfg = _ps_config(tmp_path, pki, cs, (f"fault+{url}?hang=packs/", key), name="ps-stall",
                     heartbeat_interval_seconds=0.2, segment_bytes=1 << 20,
                     cache_quota_bytes=4 << 20)
    disk = tmp_path / "disk.img"
    disk.write_bytes(random.Random(3).randbytes((3 << 20) + (512 << 10)))  # no zero blocks
    async with running_procserver(cfg) as ps:
        agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
        try:
            await agent.replicate_once()  # acknowledged: in the cache, not yet in the vault
        finally:
            agent.close()
        doc = await wait_until(cs, lambda: _backlogged(api, "ps-stall"))
        assert doc["cache_bytes"] > 3 << 20
        assert doc["cache_free_ratio"] < 0.25
        assert 0 <= doc["backlog_seconds"] < 600
        assert doc["health"] == "critical"
        assert [(a["code"], a["severity"]) for a in doc["alerts"]] == [
            ("procserver_cache_free_low", "critical")]


async def _backlogged(api: ApiClient, name: str) -> dict[str, Any] | None:
    doc = await _registered(api, name)
    return doc if doc is not None and doc["backlog_bytes"] > 3 << 20 and doc["alerts"] else None


# -- CLI ----------------------------------------------------------------------------------


async def cli(cs: ConfigServer, *args: str) -> Any:
    r = await asyncio.to_thread(run_cli, *args, "--api", cs.url, "--token-file",
                                str(cs.cfg.token_path))
    return r


# The CLI is the same over either catalog (the API tests run on both): SQLite only.
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_cli_list_show_refresh_remove(cs: ConfigServer, api: ApiClient) -> None:
    r = await cli(cs, "procserver", "list")
    assert r.returncode == 0 and r.stdout.strip() == "(none)"
    await post_beat(cs, beat(cache_free_ratio=0.28, backlog_seconds=120,
                             backlog_bytes=3 << 20))
    r = await cli(cs, "procserver", "list")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "ADDRESS", "VERSION", "HEALTH"]
    assert row.split()[:4] == ["ps1", "10.0.0.5:9443", "0.1.0", "warning"]
    assert "28%" in row and "2.0 min / 3.0 MiB" in row
    r = await cli(cs, "procserver", "list", "--json")
    assert [p["name"] for p in json.loads(r.stdout)["procservers"]] == ["ps1"]
    r = await cli(cs, "procserver", "show", "ps1")
    assert r.returncode == 0, r.stderr
    assert "procserver_cache_free_low" in r.stdout and "28% (below 30%)" in r.stdout
    r = await cli(cs, "procserver", "show", "nope")
    assert r.returncode == 2 and "no procserver named 'nope'" in r.stderr
    assert "hint:" in r.stderr
    r = await cli(cs, "procserver", "refresh", "ps1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["refresh_requested"] is True
    r = await cli(cs, "alerts", "list")
    assert r.returncode == 0 and "procserver_cache_free_low" in r.stdout
    assert "warning" in r.stdout and "ps1" in r.stdout
    r = await cli(cs, "alerts", "list", "--json")
    events = json.loads(r.stdout)["events"]
    assert [(e["code"], e["severity"], e["active"]) for e in events] == [
        ("procserver_cache_free_low", "warning", True)]
    await post_beat(cs, beat())  # the cache is fine again: the alert clears
    r = await cli(cs, "alerts", "list")
    assert r.returncode == 0 and r.stdout.strip() == "(none)"
    r = await cli(cs, "alerts", "list", "--all")
    assert "procserver_cache_free_low" in r.stdout and "CLEARED" in r.stdout
    r = await cli(cs, "events", "list", "--cleared", "--json")
    assert [e["active"] for e in json.loads(r.stdout)["events"]] == [False]
    r = await cli(cs, "events", "list", "--active", "--json")
    assert json.loads(r.stdout)["events"] == []
    r = await cli(cs, "procserver", "remove", "ps1")
    assert r.returncode == 0, r.stderr
    r = await cli(cs, "procserver", "remove", "ps1")
    assert r.returncode == 2
    assert (await api.get("/api/v1/procservers")) == {"procservers": []}
