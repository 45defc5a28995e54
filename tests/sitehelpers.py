"""Test helpers for replication through the real APIs: a machine in the inventory, a
registered process server, an enrolled agent talking mutual TLS to the site listener,
point reports, and waiting for jobs by long-polling the jobs API."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from configserver import db
from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from tests.helpers import make_vault, open_vault
from vault.regkey import make_key

T = TypeVar("T")

DONE = ("succeeded", "failed", "cancelled")


@asynccontextmanager
async def sqlite_configserver(d: Path, site_port: int = -1) -> AsyncIterator[ConfigServer]:
    """A running configuration server on a SQLite catalog in ``d``, its site listener on
    ``site_port`` (0: any port; -1, the default: none), stopped on leaving."""
    server = ConfigServer(ConfigServerConfig(
        data_dir=str(d / "cs"), listen_port=0, site_port=site_port,
        database_url=f"sqlite+aiosqlite:///{d / 'catalog.db'}"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def add_machine(api: ApiClient, name: str, disks: tuple[str, ...] = ("sda", "sdb")
                      ) -> dict[str, Any]:
    doc: dict[str, Any] = await api.post("/api/v1/machines", {
        "name": name, "ip": "192.0.2.10", "os_type": "linux", "os_name": "ubuntu",
        "os_version": "22.04",
        "disks": [{"name": d, "path": f"/dev/{d}", "size_bytes": 1 << 30} for d in disks]})
    return doc


async def register_new_vault(api: ApiClient, tmp: Path, now: float | None = None
                             ) -> tuple[str, Path]:
    """A new local vault in ``tmp/vault`` (its key ``tmp/vault.key``) the configuration
    server behind ``api`` registers with, by a key made at ``now``; its URL and key."""
    url, key = await make_vault(tmp)
    vault = await open_vault(tmp / "vault", key)
    try:
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, url, time.time() if now is None else now)),
            "vault_key_file": str(key)})
    finally:
        await vault.close()
    return url, key


async def add_procserver(url: str, internal_token: str, name: str = "ps1",
                         address: str = "127.0.0.1:9443") -> None:
    """Register a process server the way one does: its first heartbeat."""
    async with ApiClient(url, internal_token) as internal:
        await internal.post("/api/v1/internal/procservers/heartbeat", {
            "name": name, "address": address, "version": "test", "cache_bytes": 0,
            "cache_free_ratio": 1.0, "backlog_bytes": 0, "backlog_seconds": 0,
            "throughput_bps": 0, "sessions": 0})


async def heartbeat(internal: ApiClient, name: str, **figures: Any) -> None:
    """A heartbeat of process server ``name`` (registering it the first time), idle unless
    ``figures`` say otherwise (backlog_seconds, cache_free_ratio, sessions ...)."""
    await internal.post("/api/v1/internal/procservers/heartbeat", {
        "name": name, "address": f"{name}.example:9443", "version": "test",
        "cache_bytes": 0, "cache_free_ratio": 1.0, "backlog_bytes": 0,
        "backlog_seconds": 0, "throughput_bps": 0, "sessions": 0, **figures})


async def report_point(url: str, internal_token: str, machine: str, pid: str,
                       created: str = "2026-11-25T10:00:00.000000Z",
                       consistency: str = "crash") -> None:
    """Report a recovery point the way a process server does."""
    async with ApiClient(url, internal_token) as internal:
        await internal.post("/api/v1/internal/points", {
            "id": pid, "machine": machine, "created": created, "consistency": consistency})


class AgentSite:
    """A Mobility agent's side of the site listener: mutual TLS with the machine's
    certificate, obtained by enrolling with the passphrase."""

    def __init__(self, site_url: str, ca_path: Path, cert: Path | None = None,
                 key: Path | None = None) -> None:
        self.site_url, self.cert, self.key = site_url, cert, key
        self.ctx = ssl.create_default_context(cafile=str(ca_path))
        if cert is not None and key is not None:
            self.ctx.load_cert_chain(cert, key)
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    async def enroll(cls, site_url: str, ca_path: Path, machine: str, passphrase: str,
                     where: Path) -> AgentSite:
        async with aiohttp.ClientSession() as http, http.post(
                f"{site_url}/api/v1/agent/enroll", json={"machine": machine,
                                                         "passphrase": passphrase},
                ssl=ssl.create_default_context(cafile=str(ca_path))) as r:
            assert r.status == 201, await r.text()
            doc = await r.json()
        where.mkdir(parents=True, exist_ok=True)
        cert, key = where / f"{machine}.pem", where / f"{machine}.key"
        cert.write_text(doc["cert"])
        key.write_text(doc["key"])
        key.chmod(0o600)
        return cls(site_url, ca_path, cert, key)

    async def __aenter__(self) -> AgentSite:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._http is not None:
            await self._http.close()

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        assert self._http is not None
        async with self._http.request(method, self.site_url + path, json=body,
                                      ssl=self.ctx) as r:
            return r.status, await r.json()

    async def settings(self) -> tuple[int, Any]:
        return await self.call("GET", "/api/v1/agent/settings")

    async def heartbeat(self, version: str = "0.1.0") -> tuple[int, Any]:
        return await self.call("POST", "/api/v1/agent/heartbeat", {"agent_version": version})

    async def progress(self, disks: dict[str, float], resync: bool | None = None
                       ) -> tuple[int, Any]:
        body: dict[str, Any] = {"disks": disks}
        if resync is not None:
            body["resync"] = resync
        return await self.call("POST", "/api/v1/agent/progress", body)


async def wait_job(api: ApiClient, jid: str,
                   until: Callable[[dict[str, Any]], bool] = lambda j: j["state"] in DONE,
                   timeout: float = 60) -> dict[str, Any]:
    """The job once ``until(job)`` holds, long-polling the jobs API (no sleeps)."""
    doc: dict[str, Any] = await api.get(f"/api/v1/jobs/{jid}")
    async with asyncio.timeout(timeout):
        while not until(doc):
            assert doc["state"] not in DONE, f"the job ended before the wait was over: {doc}"
            doc = await api.get(f"/api/v1/jobs/{jid}", wait=30, version=doc["version"])
    return doc


def step(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in job["steps"] if s["name"] == name)


def step_running(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda j: step(j, name)["state"] == "running"


async def next_job(api: ApiClient, target: str, kind: str) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = (await api.get("/api/v1/jobs", target=target,
                                                kind=kind))["jobs"]
    assert jobs, f"no {kind} job for {target}"
    return jobs[0]


async def seed_items(server: ConfigServer, api: ApiClient, states: dict[str, str],
                     ip: str) -> None:
    """Machines named as ``states``' keys (Debian 12, one disk, on ps1) with replicated
    items in those states, written straight into the catalog: for tests of what the
    API and console offer in each state, not of how an item gets there."""
    for m in states:
        await api.post("/api/v1/machines", {
            "name": m, "ip": ip, "os_type": "linux", "os_name": "debian",
            "os_version": "12", "disks": [{"name": "sda", "path": "/dev/sda"}],
            "process_server": "ps1"})
    async with server.services.sessionmaker() as s:
        for m, state in states.items():
            s.add(db.ReplicatedItem(machine=m, policy="default", state=state,
                                    health="normal", health_errors=[],
                                    disk_progress={}, created=1.8e9, updated=1.8e9))
        await s.commit()


async def until_changed(cs: ConfigServer, check: Callable[[], Awaitable[T | None]],
                        timeout: float = 120) -> T:
    """``await check()`` once it returns something other than None, re-checked on every
    change the configuration server ``cs`` (in this process) notifies (no sleeps)."""
    async with asyncio.timeout(timeout), cs.services.notifier.changed:
        while (got := await check()) is None:
            await cs.services.notifier.changed.wait()
    return got
