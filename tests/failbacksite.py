"""A failed-over machine for the kill -9 tests of failback and re-protect, every part
real and the parts that are killed in processes of their own: ``configserver run`` on
fixed ports (a restarted server is found where the agent and the process server left
it), a process server registered with it, web01 (an ext4 image) protected by its managed
agent (one initial copy, run in the test), then failed over onto the folder target —
or onto another target the caller configures (``configserver``, ``recovery``). The
agent's ``mobility.toml`` is written for ``mobility run`` to take over."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.siteclient import SiteClient
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests.backends import _free_port, missing_backend
from tests.helpers import Daemon, write_toml
from tests.managedsite import enroll_machine, issue_procserver_cert, procserver_config
from tests.sitehelpers import next_job, register_new_vault, wait_job
from tests.test_failback_job import _ext4


@dataclass
class KillSite:
    tmp: Path
    cs_args: list[str]  # configserver run
    cs: Daemon  # the running configuration server (the newest)
    url: str
    site_url: str
    token: str
    ps: ProcServer
    cfg: MobilityConfig
    toml: Path  # the agent's mobility.toml, for mobility run
    managed: ManagedAgent  # the agent, run in the test
    disk: Path  # the original machine's disk
    recovered: Path  # the recovered machine's image on its target
    key: Path  # the vault's key file (the vault is tmp/vault)
    started: list[Daemon] = field(default_factory=list)  # every daemon: stopped at the end

    def api(self) -> ApiClient:
        return ApiClient(self.url, self.token)

    async def start_cs(self) -> None:
        """Start the configuration server again (the same data, database and ports)."""
        self.cs = Daemon(self.cs_args, "configserver_started")
        self.started.append(self.cs)
        await self.cs.start()

    def agent(self, ready_event: str) -> Daemon:
        """``mobility run`` on the agent's config, ready once it logs ``ready_event``."""
        d = Daemon(["mobility", "run", "--config", str(self.toml)], ready_event)
        self.started.append(d)
        return d


def _mobility_toml(path: Path, cfg: MobilityConfig) -> Path:
    return write_toml(path, {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                             if getattr(cfg, f.name) is not None})


@asynccontextmanager
async def failed_over_site(tmp: Path, catalog_url: str, *,
                           make_disk: Callable[[Path], None] = _ext4,
                           configserver: dict[str, Any] | None = None,
                           recovery: dict[str, Any] | None = None,
                           recovered: Callable[[Path], Path] | None = None,
                           failover_timeout: float = 120.0) -> AsyncIterator[KillSite]:
    """web01 protected through a ``configserver run`` and failed over (point latest):
    its disk made by ``make_disk`` (an ext4 image), onto the folder target unless
    ``configserver`` (more of its settings) and ``recovery`` (web01's recovery settings)
    say otherwise; ``recovered`` gives the recovered image from the server's data
    directory."""
    for tool in ("mkfs.ext4", "debugfs", "e2fsck"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs e2fsprogs")
    data = tmp / "cs"
    config = write_toml(tmp / "configserver.toml", {
        "data_dir": str(data), "listen_port": _free_port(), "site_port": _free_port(),
        "database_url": catalog_url, **(configserver or {})})
    args = ["configserver", "run", "--config", str(config)]
    first = Daemon(args, "configserver_started")
    started = [first]
    try:
        ready = await first.start()
        url = f"http://127.0.0.1:{ready['port']}"
        site_url = f"https://127.0.0.1:{ready['site_port']}"
        token = (data / "api-token").read_text().strip()
        ca = data / "ca" / "ca.pem"
        async with ApiClient(url, token) as api:
            vault_url, key = await register_new_vault(api, tmp)
            await issue_procserver_cert(api, tmp / "ps-tls")
            ps = ProcServer(procserver_config(tmp, vault_url, key, ca, site_url,
                                              data / "internal-token",
                                              heartbeat_interval_seconds=1.0))
            await ps.start()
            try:
                await first.wait_events("procserver_registered", 1)
                disk = tmp / "disk.img"
                make_disk(disk)
                cfg = await enroll_machine(
                    api, site_url, str(ca), (data / "enrollment-passphrase").read_text().strip(),
                    "web01", disk, tmp / "agent")
                toml = _mobility_toml(tmp / "mobility.toml", cfg)
                await api.post("/api/v1/replication/enable", {"machine": "web01"})
                async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert,
                                      cfg.tls_key) as sc:
                    managed = ManagedAgent(cfg, sc)
                    try:
                        job = await next_job(api, "web01", "enable_protection")
                        assert await managed.round()  # the initial copy
                        assert (await wait_job(api, job["id"]))["state"] == "succeeded"
                        fin = await next_job(api, "web01", "finalize_protection")
                        assert (await wait_job(api, fin["id"]))["state"] == "succeeded"
                        assert managed.last is not None
                        await ps.wait_point(managed.last.cycle)
                        if recovery is not None:
                            await api.call("PATCH", "/api/v1/items/web01/recovery", recovery,
                                           {})
                        done = await wait_job(api, (await api.post(
                            "/api/v1/items/web01/failover", {"point": "latest"}))["job"]["id"],
                            timeout=failover_timeout)
                        assert done["state"] == "succeeded", done
                        image = recovered(data) if recovered is not None \
                            else data / "recovered" / "web01" / "sda.img"
                        site = KillSite(tmp, args, first, url, site_url, token, ps, cfg, toml,
                                        managed, disk, image, key, started)
                        yield site
                    finally:
                        managed.close()
            finally:
                await ps.stop()
    finally:
        for d in started:
            if d.proc is not None and d.proc.returncode is None:
                await d.stop()
