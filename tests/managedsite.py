"""A protected machine through the control plane, every part real: a configuration server
(the ``cs`` fixture), a process server with a certificate from its CA, a machine enrolled
with the passphrase and replication enabled, and its managed agent (not yet run).
Shared by the revocation and policy-bandwidth tests."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configserver.ca import Issued, write_bundle
from configserver.server import ConfigServer
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.enroll import enroll_with_passphrase
from mobility.siteclient import SiteClient
from procserver.config import ProcServerConfig
from procserver.server import ProcServer
from siterecovery.apiclient import ApiCallError, ApiClient
from siterecovery.tomlconfig import load
from tests.helpers import make_disk, make_vault


@dataclass
class Site:
    pcfg: ProcServerConfig
    ps: ProcServer  # running
    cfg: MobilityConfig
    managed: ManagedAgent
    disk: Path
    ps_cert: Issued  # the process server's certificate as the API issued it


async def issue_procserver_cert(api: ApiClient, out: Path, name: str = "ps1") -> Issued:
    """A process-server certificate issued through the admin API, written into ``out``
    (``server.pem``, ``server.key``, ``ca.pem``)."""
    doc = await api.post("/api/v1/certificates/procserver",
                         {"name": name, "hosts": ["127.0.0.1", "localhost"]})
    issued = Issued(doc["cert"].encode(), doc["key"].encode(), doc["serial"], name)
    write_bundle(out, "server", issued, doc["ca"].encode())
    return issued


def procserver_config(tmp: Path, vault_url: str, key: Path, ca: Path | str, site_url: str,
                      token_file: Path | str, **kw: Any) -> ProcServerConfig:
    """ps1's configuration: its data in ``tmp/ps``, the certificate
    ``issue_procserver_cert`` wrote into ``tmp/ps-tls``, any free port, registering with
    the configuration server's site listener at ``site_url``; ``kw`` other values."""
    tls = tmp / "ps-tls"
    return ProcServerConfig(
        data_dir=str(tmp / "ps"), vault_url=vault_url, vault_key_file=str(key),
        tls_cert=str(tls / "server.pem"), tls_key=str(tls / "server.key"),
        tls_ca=str(ca), listen_port=0, metrics_port=0, name="ps1",
        configserver_url=site_url, configserver_token_file=str(token_file), **kw)


async def enroll_machine(api: ApiClient, site_url: str, ca: str, passphrase: str, name: str,
                         disk: Path, where: Path) -> MobilityConfig:
    """Machine ``name`` in the inventory (Debian 12, ``disk`` its sda, on ps1), enrolled
    with the passphrase: its agent's configuration (written into ``where``), taking
    quiesced snapshots."""
    await api.post("/api/v1/machines", {
        "name": name, "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
        "os_version": "12", "disks": [{"name": "sda", "path": str(disk)}],
        "process_server": "ps1"})
    async with SiteClient(site_url, ca) as enrolling:
        cfg_path = await enroll_with_passphrase(
            enrolling, passphrase, where, machine=name, server_host="127.0.0.1",
            server_port=1, disks=[("sda", str(disk))])
    return dataclasses.replace(load(MobilityConfig, cfg_path), snapshot="quiesced")


async def _registered(cs: ConfigServer, api: ApiClient) -> None:
    async with asyncio.timeout(60), cs.changed:
        while True:
            try:
                await api.get("/api/v1/procservers/ps1")
                return
            except ApiCallError:
                await cs.changed.wait()


@asynccontextmanager
async def managed_site(cs: ConfigServer, api: ApiClient, tmp_path: Path, *,
                       policy: str = "default", disk_size: int = 8 << 20,
                       make_disk_with: Callable[[Path], None] | None = None,
                       procserver: dict[str, object] | None = None,
                       **agent: object) -> AsyncIterator[Site]:
    """A running process server ps1 registered with ``cs``, machine web01 on it enrolled
    with the passphrase and its replication enabled under ``policy``, and its managed
    agent (no round run yet); ``make_disk_with`` writes the disk image (default: random
    data of ``disk_size``), ``procserver`` overrides procserver.toml values and ``agent``
    mobility.toml values."""
    url, key = await make_vault(tmp_path)
    tls = tmp_path / "ps-tls"
    issued = await issue_procserver_cert(api, tls)
    pcfg = ProcServerConfig(
        data_dir=str(tmp_path / "ps"), vault_url=url, vault_key_file=str(key),
        tls_cert=str(tls / "server.pem"), tls_key=str(tls / "server.key"),
        tls_ca=str(cs.ca.cert_path), listen_port=0, metrics_port=0, name="ps1",
        configserver_url=cs.site_url,
        configserver_token_file=str(cs.cfg.internal_token_path))
    pcfg = dataclasses.replace(pcfg, **(procserver or {}))  # type: ignore[arg-type]
    disk = tmp_path / "disk.img"
    if make_disk_with is None:
        make_disk(disk, disk_size, seed=3)
    else:
        make_disk_with(disk)
    ps = ProcServer(pcfg)
    await ps.start()
    try:
        await _registered(cs, api)
        await api.post("/api/v1/machines", {
            "name": "web01", "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
            "os_version": "12", "disks": [{"name": "sda", "path": str(disk)}],
            "process_server": "ps1"})
        async with SiteClient(cs.site_url, str(cs.ca.cert_path)) as enrolling:
            cfg_path = await enroll_with_passphrase(
                enrolling, cs.passphrase, tmp_path / "agent", machine="web01",
                server_host="127.0.0.1", server_port=1, disks=[("sda", str(disk))])
        cfg = dataclasses.replace(load(MobilityConfig, cfg_path), snapshot="quiesced",
                                  **agent)  # type: ignore[arg-type]
        await api.post("/api/v1/replication/enable", {"machine": "web01", "policy": policy})
        async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as cp:
            managed = ManagedAgent(cfg, cp)
            try:
                yield Site(pcfg, ps, cfg, managed, disk, issued)
            finally:
                managed.close()
    finally:
        await ps.stop()
