"""Protect a machine through the control plane, every part real: a process server with a
certificate from the configuration server's CA reporting over the site listener, an
agent enrolled with the passphrase that pulls its settings, heartbeats and reports
progress, and the "Enable protection" job carrying the item to protected."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from configserver.ca import write_bundle
from configserver.server import ConfigServer
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.enroll import enroll_with_passphrase
from mobility.siteclient import SiteClient
from procserver.config import ProcServerConfig
from siterecovery.apiclient import ApiCallError, ApiClient
from siterecovery.tomlconfig import load
from tests.helpers import make_disk, make_vault, mutate, open_vault, restore_all, sha256
from tests.helpers import running_procserver as running
from tests.sitehelpers import next_job, wait_job

T = TypeVar("T")


async def wait_until(cs: ConfigServer, check: Callable[[], Awaitable[T | None]],
                     timeout: float = 60) -> T:
    """Re-check after every change the configuration server announces."""
    async with asyncio.timeout(timeout), cs.changed:
        while (result := await check()) is None:
            await cs.changed.wait()
        return result


async def events(api: ApiClient, code: str) -> list[dict[str, Any]]:
    doc = await api.get("/api/v1/events", target="web01", active="false")
    return [e for e in doc["events"] if e["code"] == code]


async def counted(cs: ConfigServer, api: ApiClient, code: str, n: int) -> None:
    """Until ``n`` events ``code`` are recorded (the agent's last progress report may land
    after its round returned)."""
    async def enough() -> bool | None:
        return True if len(await events(api, code)) >= n else None

    await wait_until(cs, enough, timeout=30)
    assert len(await events(api, code)) == n


async def resyncs(cs: ConfigServer, api: ApiClient, managed: ManagedAgent, cfg: MobilityConfig,
                  disk: Path) -> None:
    """A lost agent map, then an operator's resync: each compares against the vault's
    newest point, sends the differences and shows as a resynchronization."""
    shutil.rmtree(cfg.state_dir)
    mutate(disk, 0.05, seed=5)
    assert await managed.round()
    r = managed.last
    assert r is not None and r.kind == "resync"
    assert 0 < r.bytes_sent <= 0.07 * (8 << 20)
    await counted(cs, api, "resync_started", 1)
    await counted(cs, api, "resync_completed", 1)
    item = await api.get("/api/v1/items/web01")
    assert (item["state"], item["resync_progress"]) == ("protected", None)

    item = await api.post("/api/v1/items/web01/resync")
    assert item["state"] == "resync_required"
    with pytest.raises(ApiCallError) as e:  # no such item
        await api.post("/api/v1/items/nosuch/resync")
    assert e.value.status == 404
    assert await managed.round()  # the settings ask for it: the agent ignores its maps
    r = managed.last
    assert r is not None and (r.kind, r.blocks_sent) == ("resync", 0)
    await counted(cs, api, "resync_requested", 1)
    await counted(cs, api, "resync_completed", 2)
    assert (await api.get("/api/v1/items/web01"))["state"] == "protected"


async def test_protect_a_machine_through_the_control_plane(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    url, key = await make_vault(tmp_path)
    tls = write_bundle(tmp_path / "ps-tls", "server",
                       cs.ca.issue_server("ps1", ["127.0.0.1", "localhost"]), cs.ca.cert_pem)
    pcfg = ProcServerConfig(
        data_dir=str(tmp_path / "ps"), vault_url=url, vault_key_file=str(key),
        tls_cert=str(tls[0]), tls_key=str(tls[1]), tls_ca=str(cs.ca.cert_path),
        listen_port=0, metrics_port=0, name="ps1", configserver_url=cs.site_url,
        configserver_token_file=str(cs.cfg.internal_token_path))
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 << 20, seed=3)
    async with running(pcfg) as ps:

        async def registered() -> dict[str, Any] | None:
            try:
                doc: dict[str, Any] = await api.get("/api/v1/procservers/ps1")
                return doc
            except ApiCallError:
                return None

        assert (await wait_until(cs, registered))["address"] == f"127.0.0.1:{ps.port}"
        await api.post("/api/v1/machines", {
            "name": "web01", "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
            "os_version": "12", "disks": [{"name": "sda", "path": str(disk)}],
            "process_server": "ps1"})
        # The agent's own path: the passphrase on the site listener. Its process server is
        # a placeholder: the settings name the one the inventory assigned.
        async with SiteClient(cs.site_url, str(cs.ca.cert_path)) as site:
            cfg_path = await enroll_with_passphrase(
                site, cs.passphrase, tmp_path / "agent", machine="web01",
                server_host="127.0.0.1", server_port=1, disks=[("sda", str(disk))])
        cfg = dataclasses.replace(load(MobilityConfig, cfg_path), snapshot="quiesced")
        assert cfg.site_url == cs.site_url
        job = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]
        async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as cp:
            managed = ManagedAgent(cfg, cp)
            try:
                assert await managed.round()  # settings, heartbeat, the initial copy
                assert managed.agent.cfg.server_port == ps.port
                first = sha256(disk)
                assert (await wait_job(api, job["id"]))["state"] == "succeeded"
                fin = await next_job(api, "web01", "finalize_protection")
                assert (await wait_job(api, fin["id"]))["state"] == "succeeded"
                item = await api.get("/api/v1/items/web01")
                assert item["state"] == "protected"
                assert item["initial_progress"] == 100.0
                mutate(disk, 0.1, seed=4)
                assert await managed.round()  # a delta: the item's latest point moves on
                second = sha256(disk)
                assert managed.last is not None and managed.last.kind == "delta"
                second_cycle = managed.last.cycle

                async def moved() -> dict[str, Any] | None:
                    doc: dict[str, Any] = await api.get("/api/v1/items/web01")
                    return doc if doc["latest_point"] != item["latest_point"] else None

                latest = await wait_until(cs, moved)
                await resyncs(cs, api, managed, cfg, disk)
                third = sha256(disk)
                assert managed.last is not None
                last_point = await ps.wait_point(managed.last.cycle)
            finally:
                managed.close()
        machine = await api.get("/api/v1/machines/web01")
        assert machine["agent_version"] and machine["last_contact"]
    vault = await open_vault(tmp_path / "vault", key)
    try:
        points = {p.id: p for p in await vault.list_points("web01")}
        assert await restore_all(vault, points[item["latest_point"]], tmp_path / "o") == {
            "sda": first}
        assert points[latest["latest_point"]].cycle == second_cycle
        assert await restore_all(vault, points[latest["latest_point"]], tmp_path / "o") == {
            "sda": second}
        assert await restore_all(vault, points[last_point], tmp_path / "o") == {"sda": third}
    finally:
        await vault.close()
