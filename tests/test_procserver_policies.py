"""Policies at the process server: a real process server pulls its machines' policies from a
real configuration server, forgets points past their retention in the vault and in the
catalog (every kept point still restores byte-exact), shows RPO metrics, keeps its saved
policies while the configuration server is down, and ignores malformed answers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from configserver.server import ConfigServer
from mobility.snapshot import Quiesced, Scripts
from procserver.config import ProcServerConfig
from procserver.policies import POLICY_FILE
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    mutate,
    proc_config,
    restore_all,
    running_procserver,
    sha256,
)
from tests.sitehelpers import add_machine, add_procserver, report_point
from vault.retention import created_at

PS, MACHINE = "ps-pol", "web01"
POLICY = {"name": "short", "retention_hours": 1, "rpo_threshold_seconds": 600,
          "crash_consistent_interval_seconds": 60, "app_consistent_frequency_seconds": 0}


@pytest.fixture
async def catalog_url(tmp_path: Path) -> str:
    """SQLite only here: the routes on PostgreSQL are exercised by test_openapi.py."""
    return f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"


def _config(tmp: Path, pki: Pki, cs: ConfigServer, vault_at: tuple[str, Path]
            ) -> ProcServerConfig:
    url, key = vault_at
    # Heartbeats and policy pulls at start and when woken only: the test drives them.
    return proc_config(tmp, pki, url, key, configserver_url=cs.url,
                       configserver_token_file=str(cs.cfg.internal_token_path), name=PS,
                       heartbeat_interval_seconds=3600, policy_interval_seconds=3600,
                       segment_bytes=1 << 20, cache_quota_bytes=16 << 20)


async def _protect(cs: ConfigServer, api: ApiClient) -> None:
    """Policy "short" (1 h of points), MACHINE assigned to PS, replication enabled."""
    await api.post("/api/v1/policies", POLICY)
    await add_procserver(cs.url, cs.internal_token, PS)
    await add_machine(api, MACHINE, ("sda",))
    await api.patch(f"/api/v1/machines/{MACHINE}", {"process_server": PS})
    await api.post("/api/v1/replication/enable", {"machine": MACHINE, "policy": "short"})


async def _round(ps: ProcServer, check: Callable[[], bool] = lambda: True,
                 after: int | None = None, timeout: float = 30) -> None:
    """Wait until the policy loop ended a round after round ``after`` (default: wake it
    now and wait for that round) and ``check()`` holds."""
    pol = ps.policies
    if after is None:
        after = pol.rounds
        pol.wake()
    async with asyncio.timeout(timeout), pol.changed:
        await pol.changed.wait_for(lambda: pol.rounds > after and check())


async def _make_points(tmp: Path, pki: Pki, ps: ProcServer, n: int, *, app_first: bool = False
                       ) -> list[tuple[str, str]]:
    """``n`` cycles of MACHINE (the disk changes between them): [(point id, disk sha256)]."""
    disk = tmp / f"{MACHINE}.img"
    if not disk.exists():
        disk.write_bytes(random.Random(9).randbytes(2 << 20))
    agent = make_agent(agent_config(tmp, pki, MACHINE, ps.port, {"sda": disk}))
    out: list[tuple[str, str]] = []
    try:
        for i in range(n):
            mutate(disk, 0.25, seed=i + 1)
            agent.provider = Scripts("true", "true", 10, Quiesced()) if app_first and i == 0 \
                else Quiesced()
            r = await agent.replicate_once()
            assert r.consistency == ("app" if app_first and i == 0 else "crash")
            out.append((await ps.wait_point(r.cycle), sha256(disk)))
    finally:
        agent.close()
    return out


async def _catalog(api: ApiClient) -> set[str]:
    return {p["id"] for p in (await api.get("/api/v1/points", machine=MACHINE))["points"]}


async def _wait_catalog(cs: ConfigServer, api: ApiClient, want: set[str]) -> None:
    async with asyncio.timeout(30), cs.changed:
        while await _catalog(api) != want:
            await cs.changed.wait()


async def _times(ps: ProcServer, ids: list[str]) -> list[datetime]:
    return [created_at(await ps.vault.read_point(pid)) for pid in ids]


async def _in_vault(ps: ProcServer) -> set[str]:
    return {p.id for p in await ps.vault.list_points(MACHINE)}


async def _metrics(ps: ProcServer) -> dict[tuple[str, str], float]:
    """Samples by (name, machine label or "")."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{ps.metrics_port}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {(s.name, s.labels.get("machine", "")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _dead_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_pulled_retention_forgets_old_points_in_vault_and_catalog(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path], cs: ConfigServer,
        api: ApiClient) -> None:
    await _protect(cs, api)
    async with running_procserver(_config(tmp_path, pki, cs, vault_at)) as ps:
        # The first round at start pulls the policy of the machine assigned here.
        await _round(ps, lambda: MACHINE in ps.policies.items, after=0)
        assert ps.policies.items[MACHINE].retention_hours == 1
        assert json.loads((tmp_path / "procserver" / POLICY_FILE).read_text())["items"] == [
            {"machine": MACHINE, "policy": {**POLICY, "block_size": 65536}}]
        # A changed policy arrives with the refresh an operator asks for.
        await api.patch("/api/v1/policies/short", {"rpo_threshold_seconds": 900})
        await api.post(f"/api/v1/procservers/{PS}/refresh")
        ps.reporter.beat()
        await _round(ps, lambda: ps.policies.items[MACHINE].rpo_threshold_seconds == 900,
                     after=ps.policies.rounds)

        # Five points: an app-consistent one, then four crash-consistent deltas.
        made = await _make_points(tmp_path, pki, ps, 5, app_first=True)
        ids = [pid for pid, _ in made]
        expected = dict(made)
        await _wait_catalog(cs, api, set(ids))
        t = await _times(ps, ids)
        # Now is past the retention for p0..p2 (p3 is just inside): p1 and p2 go; p0 stays
        # as the newest app-consistent point, p4 as the newest.
        now = t[2] + timedelta(hours=1) + (t[3] - t[2]) / 2
        ps.policies.clock = lambda: now
        with structlog.testing.capture_logs() as logs:
            report = await ps.policies.apply_retention()
        assert report.forgotten == {MACHINE: [ids[1], ids[2]]}
        assert report.kept == {ids[0]: "newest app-consistent",
                               ids[3]: "inside the keep-all window", ids[4]: "newest"}
        # p3's chain crossed p2: p3 gets full maps; p4, a delta on p3, then rests on a
        # full point and is left as it is (vault/chain.py, as prune does).
        assert report.rebased == [ids[3]]
        [ev] = [e for e in logs if e["event"] == "points_forgotten"]
        assert (ev["machine"], ev["count"], ev["retention_hours"]) == (MACHINE, 2, 1)
        assert await _in_vault(ps) == {ids[0], ids[3], ids[4]}
        # The catalog is told by the next round; nothing more is forgotten by it.
        await _round(ps)
        await _wait_catalog(cs, api, {ids[0], ids[3], ids[4]})
        assert await _in_vault(ps) == {ids[0], ids[3], ids[4]}
        for p in await ps.vault.list_points(MACHINE):
            assert await restore_all(ps.vault, p, tmp_path / "out") == {"sda": expected[p.id]}
        item = await api.get(f"/api/v1/items/{MACHINE}")
        assert item["latest_point"] == ids[4] and item["latest_app_point"] == ids[0]

        m = await _metrics(ps)
        assert m[("siterecovery_procserver_item_rpo_seconds", MACHINE)] == pytest.approx(
            (now - t[4]).total_seconds(), abs=1e-6)
        assert m[("siterecovery_procserver_item_rpo_threshold_seconds", MACHINE)] == 900
        assert ps.space.used == 0  # everything uploaded: the whole quota is free
        assert m[("siterecovery_procserver_cache_free_ratio", "")] == 1.0
        assert m[("siterecovery_procserver_upload_backlog_seconds", "")] == 0.0


async def test_saved_policies_apply_while_the_configuration_server_is_down(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path], cs: ConfigServer,
        api: ApiClient) -> None:
    await _protect(cs, api)
    cfg = _config(tmp_path, pki, cs, vault_at)
    async with running_procserver(cfg) as ps:
        await _round(ps, lambda: MACHINE in ps.policies.items, after=0)
        made = await _make_points(tmp_path, pki, ps, 3)
        ids = [pid for pid, _ in made]
        await _wait_catalog(cs, api, set(ids))
    saved = (tmp_path / "procserver" / POLICY_FILE).read_bytes()

    async with running_procserver(dataclasses.replace(cfg, configserver_url=_dead_url())
                                  ) as ps:
        await _round(ps, after=0)  # its pull failed: the saved policy stays in force
        assert ps.policies.items[MACHINE].retention_hours == 1
        assert (tmp_path / "procserver" / POLICY_FILE).read_bytes() == saved
        t = await _times(ps, ids)
        # Every point inside the hour: nothing is forgotten.
        ps.policies.clock = lambda: t[2] + timedelta(minutes=30)
        assert (await ps.policies.apply_retention()).forgotten == {}
        assert await _in_vault(ps) == set(ids)
        m = await _metrics(ps)
        assert m[("siterecovery_procserver_item_rpo_threshold_seconds", MACHINE)] == 600
        assert m[("siterecovery_procserver_item_rpo_seconds", MACHINE)] == pytest.approx(
            1800, abs=1e-6)
        # p0 past the hour: only p0 goes, p1 (a delta on it) gets full maps.
        ps.policies.clock = lambda: t[0] + timedelta(hours=1) + (t[1] - t[0]) / 2
        report = await ps.policies.apply_retention()
        assert report.forgotten == {MACHINE: [ids[0]]}
        assert report.rebased == [ids[1]]  # p1 crossed p0; p2 then rests on a full p1
        assert await _in_vault(ps) == set(ids[1:])
        for p in await ps.vault.list_points(MACHINE):
            assert await restore_all(ps.vault, p, tmp_path / "out") == {"sda": dict(made)[p.id]}
        await _round(ps)  # the catalog cannot be told now
    assert await _catalog(api) == set(ids)

    # The configuration server is reachable again: the outbox survived the restart.
    async with running_procserver(cfg) as ps:
        await _wait_catalog(cs, api, set(ids[1:]))
        await _round(ps, after=0)
        assert await _in_vault(ps) == set(ids[1:])  # the real clock forgets nothing more


# -- a configuration server that answers nonsense ---------------------------------------

_GOOD = {"name": "short", "rpo_threshold_seconds": 600, "retention_hours": 1,
         "app_consistent_frequency_seconds": 0, "crash_consistent_interval_seconds": 60,
         "block_size": 65536}


def _answer(*items: Any, **policy: Any) -> bytes:
    items = items or ({"machine": MACHINE, "policy": {**_GOOD, **policy}},)
    return json.dumps({"items": list(items)}).encode()


MALFORMED = [
    b"not json", b"[]", b'{"items": {}}', b'{"items": null}', b"{}",
    _answer({"machine": "../etc", "policy": _GOOD}),
    _answer(retention_hours=0), _answer(retention_hours=-3), _answer(retention_hours="1"),
    _answer(retention_hours=1.5), _answer(retention_hours=True),
    _answer(rpo_threshold_seconds=None), _answer(name=""),
    _answer({"machine": MACHINE, "policy": _GOOD}, {"machine": MACHINE, "policy": _GOOD}),
    _answer({"machine": MACHINE, "policy": "short"}),
    _answer({"machine": MACHINE, "policy": _GOOD}, {"machine": "db01"}),  # half good
]


@dataclasses.dataclass
class _Stub:
    body: bytes = b""
    status: int = 200
    served: int = 0

    async def policies(self, request: web.Request) -> web.Response:
        assert request.match_info["name"] == PS
        self.served += 1
        return web.Response(body=self.body, status=self.status,
                            content_type="application/json")


@asynccontextmanager
async def _stub_server(stub: _Stub) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/api/v1/internal/procservers/{name}/policies", stub.policies)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_malformed_policy_answer_changes_nothing(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path], cs: ConfigServer,
        api: ApiClient) -> None:
    await _protect(cs, api)
    cfg = _config(tmp_path, pki, cs, vault_at)
    async with running_procserver(cfg) as ps:
        await _round(ps, lambda: MACHINE in ps.policies.items, after=0)
        ids = [pid for pid, _ in await _make_points(tmp_path, pki, ps, 3)]
        await _wait_catalog(cs, api, set(ids))
    path = tmp_path / "procserver" / POLICY_FILE
    saved = path.read_bytes()

    stub = _Stub(body=MALFORMED[0])
    async with _stub_server(stub) as url:
        with structlog.testing.capture_logs() as logs:
            async with running_procserver(dataclasses.replace(cfg, configserver_url=url)
                                          ) as ps:
                before = dict(ps.policies.items)
                assert before[MACHINE].retention_hours == 1  # the saved answer
                await _round(ps, after=0)
                for body in MALFORMED[1:]:
                    stub.body = body
                    await _round(ps)
                    assert ps.policies.items == before, body
                    assert path.read_bytes() == saved, body
                assert stub.served == len(MALFORMED)
                rejected = [e for e in logs if e["event"] == "policies_rejected"]
                assert len(rejected) == len(MALFORMED)
                assert all(e["log_level"] == "error" and e["hint"] for e in rejected)
                # Retention still follows the saved hour: nothing of this hour goes.
                t = await _times(ps, ids)
                ps.policies.clock = lambda: t[0] + timedelta(minutes=59)
                assert (await ps.policies.apply_retention()).forgotten == {}
                assert await _in_vault(ps) == set(ids)
                # A well-formed answer is taken (so the ones above were really refused) …
                stub.body = _answer(retention_hours=2, rpo_threshold_seconds=120)
                await _round(ps, lambda: ps.policies.items[MACHINE].retention_hours == 2)
                assert json.loads(path.read_text())["items"][0]["policy"]["retention_hours"] == 2
                # … and an error status changes nothing either.
                stub.body, stub.status = b'{"items": []}', 500
                await _round(ps)
                assert ps.policies.items[MACHINE].rpo_threshold_seconds == 120
                assert await _in_vault(ps) == set(ids)
    assert await _catalog(api) == set(ids)


# -- the two internal routes, directly ---------------------------------------------------

async def _call(cs: ConfigServer, method: str, path: str, body: Any = None,
                token: str | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(
            method, cs.url + path, json=body,
            headers={"Authorization": f"Bearer {token or cs.internal_token}"}) as r:
        return r.status, await r.json()


async def test_policy_and_forgotten_routes(cs: ConfigServer, api: ApiClient) -> None:
    await _protect(cs, api)
    await add_procserver(cs.url, cs.internal_token, "ps-other")
    await add_machine(api, "db01", ("sda",))  # another process server's machine
    await api.patch("/api/v1/machines/db01", {"process_server": "ps-other"})
    await api.post("/api/v1/replication/enable", {"machine": "db01"})
    await add_machine(api, "app01", ("sda",))  # assigned here, but not replicated
    await api.patch("/api/v1/machines/app01", {"process_server": PS})
    path = f"/api/v1/internal/procservers/{PS}/policies"
    assert await _call(cs, "GET", path) == (200, {"items": [
        {"machine": MACHINE, "policy": {**POLICY, "block_size": 65536}}]})
    status, body = await _call(cs, "GET", "/api/v1/internal/procservers/ps-other/policies")
    assert status == 200 and [(i["machine"], i["policy"]["name"]) for i in body["items"]] \
        == [("db01", "default")]
    status, body = await _call(cs, "GET", "/api/v1/internal/procservers/nope/policies")
    assert (status, body["error"]["code"]) == (404, "procserver_not_found")
    assert "heartbeat" in body["error"]["hint"]
    status, body = await _call(cs, "GET", path, token=cs.admin_token)
    assert (status, body["error"]["code"]) == (401, "unauthorized")

    pids = [f"{n:064x}" for n in range(1, 4)]
    for i, pid in enumerate(pids):
        await report_point(cs.url, cs.internal_token, MACHINE, pid,
                           f"2026-11-25T10:00:0{i}.000000Z")
    assert await _catalog(api) == set(pids)
    forgotten = "/api/v1/internal/points/forgotten"
    for bad in ({"points": ["../x"]}, {"points": "x"}, {}, {"points": [pids[0]], "x": 1},
                {"points": [pids[0]] * 1001}):
        status, body = await _call(cs, "POST", forgotten, bad)
        assert (status, body["error"]["code"]) == (422, "invalid_request"), bad
    status, body = await _call(cs, "POST", forgotten, {"points": pids[:2]}, cs.admin_token)
    assert status == 401
    assert await _catalog(api) == set(pids)  # none of the above removed anything
    unknown = "f" * 64
    assert await _call(cs, "POST", forgotten, {"points": [pids[0], pids[1], unknown]}) == (
        200, {"removed": 2})
    assert await _call(cs, "POST", forgotten, {"points": [pids[0]]}) == (200, {"removed": 0})
    assert await _catalog(api) == {pids[2]}
