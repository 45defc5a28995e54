"""#12 item 3: a vault whose disk is full. The process server's uploads fail with ENOSPC
and retry; past ``storage_alert_seconds`` of failing the configuration server raises
``procserver_storage_failing`` naming the error and the process server's health turns
warning (critical at three times the threshold); once there is room again the cycle
lands as a whole point and the alert clears. Real parts: a vault on a small tmpfs that
really fills up, a real process server and agent, a real configuration server (SQLite and
PostgreSQL) whose clock the test moves to age the failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from procserver.server import ProcServer
from procserver.storagehealth import StorageHealth
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.backends import missing_backend
from tests.csclock import Clock
from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    make_disk,
    make_vault,
    mutate,
    open_vault,
    proc_config,
    restore_all,
    sha256,
)

CODE = "procserver_storage_failing"
PS = "ps1"


@pytest.fixture
async def full_fs(tmp_path: Path) -> AsyncIterator[Path]:
    """A 16 MiB tmpfs (the vault's disk)."""
    if os.geteuid() != 0:
        missing_backend("root (a small tmpfs for the vault)", "run the suite as root")
    fs = tmp_path / "vaultfs"
    fs.mkdir()
    await asyncio.to_thread(subprocess.run, ["mount", "-t", "tmpfs", "-o", "size=16m",
                                             "tmpfs", str(fs)], check=True)
    try:
        yield fs
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(fs)], check=False)


def _fill(fs: Path) -> Path:
    """Fill ``fs`` to the last byte; the filler's path."""
    filler = fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
    return filler


async def _until(cs: ConfigServer, api: ApiClient, check: Callable[[dict[str, Any]], bool]
                 ) -> dict[str, Any]:
    """The process server's document once ``check`` holds (woken by the catalog)."""
    async with asyncio.timeout(60), cs.changed:
        while True:
            try:
                doc: dict[str, Any] = await api.get(f"/api/v1/procservers/{PS}")
            except ApiCallError as e:  # 404 until its first heartbeat
                assert e.status == 404, e
            else:
                if check(doc):
                    return doc
            await cs.changed.wait()


async def _metric(cs: ConfigServer) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{cs.url}/metrics") as r:
        text = await r.text()
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "siterecovery_configserver_procserver_storage_failing_seconds"
                and s.labels == {"procserver": PS})


async def test_vault_disk_full_raises_and_clears_the_storage_alert(
        tmp_path: Path, pki: Pki, catalog_url: str, full_fs: Path) -> None:
    clock = Clock()
    cs = ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0,
                                         site_port=0, database_url=catalog_url,
                                         alert_interval_seconds=3600,
                                         storage_alert_seconds=240), clock=clock)
    await cs.start()
    url, key = await make_vault(full_fs)
    # Heartbeats at start and when the test asks (beat()).
    cfg = proc_config(tmp_path, pki, url, key, configserver_url=cs.url,
                      configserver_token_file=str(cs.cfg.internal_token_path), name=PS,
                      heartbeat_interval_seconds=3600, segment_bytes=1 << 20)
    disk = tmp_path / "disk.img"
    make_disk(disk, 4 << 20, seed=7)
    ps = ProcServer(cfg)
    try:
        async with ApiClient(cs.url, cs.admin_token) as api:
            await ps.start()
            await _until(cs, api, lambda d: True)  # registered by its first heartbeat
            agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
            try:
                first = await ps.wait_point((await agent.replicate_once()).cycle)
                filler = await asyncio.to_thread(_fill, full_fs)  # the vault's disk is full
                mutate(disk, 0.25, seed=8)
                cycle = (await agent.replicate_once()).cycle  # acknowledged: in the cache
            finally:
                agent.close()
            storage = ps.reporter.storage
            async with asyncio.timeout(60):
                await storage.wait_until(failing=True)
            clock.now = t0 = float(int(clock()))
            ps.reporter.beat()
            doc = await _until(cs, api, lambda d: d["storage_error"] is not None)
            assert "No space left on device" in doc["storage_error"], doc
            assert (doc["health"], doc["alerts"]) == ("normal", [])  # not yet for long

            # Aged past storage_alert_seconds: warning, naming the error.
            clock.now = t0 + 240
            await api.post("/api/v1/alerts/evaluate")
            doc = await api.get(f"/api/v1/procservers/{PS}")
            [alert] = doc["alerts"]
            assert (alert["code"], alert["severity"], doc["health"]) == (CODE, "warning",
                                                                         "warning")
            assert "uploads to the vault have failed for 4.0 min" in alert["message"]
            assert "No space left on device" in alert["message"], alert
            assert doc["storage_failing_seconds"] >= 240
            assert await _metric(cs) >= 0
            clock.now = t0 + 720  # three times the threshold (before the heartbeat alert)
            await api.post("/api/v1/alerts/evaluate")
            doc = await api.get(f"/api/v1/procservers/{PS}")
            assert [(a["code"], a["severity"]) for a in doc["alerts"]] == [(CODE, "critical")]
            assert doc["health"] == "critical"
            listed = (await api.get("/api/v1/events", active=True, target=PS))["events"]
            assert [(e["code"], e["severity"]) for e in listed] == [(CODE, "critical")]

            # Room again: the cycle lands whole, the next heartbeat clears the alert.
            filler.unlink()
            async with asyncio.timeout(120):
                await storage.wait_until(failing=False)
            point = await ps.wait_point(cycle)
            ps.reporter.beat()
            # (the heartbeat's row is committed before its evaluation: wait for both)
            doc = await _until(cs, api, lambda d: d["storage_error"] is None and not d["alerts"])
            assert (doc["health"], doc["alerts"], doc["storage_failing_seconds"]) == (
                "normal", [], 0.0)
            assert await _metric(cs) == 0.0
            history = (await api.get("/api/v1/events", code=CODE, target=PS))["events"]
            assert [(e["severity"], e["active"]) for e in history] == [
                ("critical", False), ("warning", False)]
            vault = await open_vault(full_fs / "vault", key)
            try:
                points = await vault.list_points("web01")
                assert [p.id for p in points] == [first, point]
                p = points[-1]
                assert await restore_all(vault, p, tmp_path / "out") == {"sda": sha256(disk)}
            finally:
                await vault.close()
    finally:
        with contextlib.suppress(Exception):
            await ps.stop()
        await cs.stop()


def test_storage_health_runs_per_machine() -> None:
    now = [100.0]
    h = StorageHealth(clock=lambda: now[0])
    assert h.heartbeat() == {"storage_failing_seconds": 0.0, "storage_error": None}
    h.failed("a", OSError(28, "No space left on device"))
    now[0] = 110.0
    h.failed("b", "later")
    h.failed("a", RuntimeError("again"))  # the run of a goes on: its start stays
    now[0] = 130.0
    assert h.heartbeat() == {"storage_failing_seconds": 30.0,
                             "storage_error": "RuntimeError: again"}
    h.succeeded("a")  # b still fails, since 110
    assert h.heartbeat() == {"storage_failing_seconds": 20.0, "storage_error": "later"}
    h.forget("b")
    assert not h.failing and h.heartbeat()["storage_failing_seconds"] == 0.0
