"""The managed site ``chaos.py`` runs its faults against: a vault in a local folder, a
configuration server on fixed ports (so that it comes back where the others look for it
after a ``kill -9``), a process server registered with it with a certificate from its
CA, the proxy in front of the process server, and machine chaos01 enrolled with the
passphrase, its replication enabled under the default policy (24 h of points: nothing
the run makes is forgotten)."""

from __future__ import annotations

import asyncio
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bench_ingest import toml
from chaosdaemons import Daemon, Proxy, free_port

from configserver.ca import Issued, write_bundle
from mobility.enroll import enroll_with_passphrase
from mobility.siteclient import SiteClient
from siterecovery.apiclient import ApiCallError, ApiClient
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile
from vault.repo import Vault
from vault.store.local import LocalStore

MACHINE = "chaos01"


@dataclass
class ChaosSite:
    root: Path
    key: Path
    vault_dir: Path
    cs: Daemon
    ps: Daemon
    proxy: Proxy
    api_url: str
    agent_config: Path

    @classmethod
    async def build(cls, root: Path, disk: Path) -> ChaosSite:
        key, vault_dir = root / "vault.key", root / "vault"
        v = await Vault.create(LocalStore(vault_dir), KeyMaterial(keyfile=new_keyfile(key)))
        await v.close()
        cs_dir, admin, site_port = root / "configserver", free_port(), free_port()
        (root / "configserver.toml").write_text(toml({
            "data_dir": str(cs_dir), "listen_port": admin, "site_port": site_port}))
        cs = Daemon("configserver", root / "configserver.toml", "configserver_started")
        await cs.start()
        site_url, api_url = f"https://127.0.0.1:{site_port}", f"http://127.0.0.1:{admin}"
        ps = Daemon("procserver", root / "procserver.toml", "procserver_started")
        proxy = Proxy()
        await proxy.start()
        try:
            async with ApiClient(api_url, (cs_dir / "api-token").read_text().strip()) as api:
                tls = root / "ps-tls"
                doc = await api.post("/api/v1/certificates/procserver",
                                     {"name": "ps1", "hosts": ["127.0.0.1"]})
                write_bundle(tls, "server", Issued(doc["cert"].encode(), doc["key"].encode(),
                                                   doc["serial"], "ps1"), doc["ca"].encode())
                (root / "procserver.toml").write_text(toml({
                    "data_dir": str(root / "procserver"), "vault_url": f"file://{vault_dir}",
                    "vault_key_file": str(key), "tls_cert": str(tls / "server.pem"),
                    "tls_key": str(tls / "server.key"), "tls_ca": str(cs_dir / "ca/ca.pem"),
                    "listen_port": 0, "metrics_port": 0, "resume_window_seconds": 60.0,
                    "name": "ps1", "configserver_url": site_url,
                    "configserver_token_file": str(cs_dir / "internal-token"),
                    "heartbeat_interval_seconds": 2.0}))
                proxy.target = int((await ps.start())["port"])
                await _registered(api)
                await api.post("/api/v1/machines", {
                    "name": MACHINE, "ip": "192.0.2.7", "os_type": "linux",
                    "os_name": "debian", "os_version": "12",
                    "disks": [{"name": "sda", "path": str(disk)}], "process_server": "ps1"})
                async with SiteClient(site_url, str(cs_dir / "ca/ca.pem")) as enrolling:
                    agent_config = await enroll_with_passphrase(
                        enrolling, (cs_dir / "enrollment-passphrase").read_text().strip(),
                        root / "agent", machine=MACHINE, server_host="127.0.0.1",
                        server_port=proxy.port, disks=[("sda", str(disk))])
                doc = tomllib.loads(agent_config.read_text())
                agent_config.write_text(toml({**doc, "snapshot": "quiesced",
                                              "connect_timeout_seconds": 10.0}))
                await api.post("/api/v1/replication/enable", {"machine": MACHINE,
                                                              "policy": "default"})
        except BaseException:
            await ps.stop()
            await cs.stop()
            await proxy.close()
            raise
        return cls(root, key, vault_dir, cs, ps, proxy, api_url, agent_config)

    def api(self) -> ApiClient:
        token = (self.root / "configserver/api-token").read_text().strip()
        return ApiClient(self.api_url, token)

    async def catalog(self) -> set[str]:
        """The ids of chaos01's points in the configuration server's catalog."""
        async with self.api() as api:
            doc = await api.get("/api/v1/points", machine=MACHINE)
        return {p["id"] for p in doc["points"]}

    async def item_state(self) -> str:
        """chaos01's replicated item ("protected" once Enable protection saw the agent's
        initial replication through)."""
        async with self.api() as api:
            return str((await api.get(f"/api/v1/items/{MACHINE}"))["state"])

    async def vault_points(self) -> dict[str, str]:
        """chaos01's points in the vault: id → the agent's cycle."""
        v = await Vault.open(LocalStore(self.vault_dir),
                             KeyMaterial(keyfile=read_keyfile(self.key)))
        try:
            return {p.id: p.cycle for p in await v.list_points(MACHINE)}
        finally:
            await v.close()

    async def catalog_has(self, points: set[str]) -> None:
        """Until the catalog lists every one of ``points`` (the process server's outbox
        delivers them; the caller bounds the wait)."""
        while True:
            self.cs.changed.clear()  # before the look: a point recorded during it wakes
            if not points - await self.catalog():
                return
            await self.cs.changed.wait()

    async def close(self) -> None:
        await self.ps.stop()
        await self.cs.stop()
        await self.proxy.close()


async def _registered(api: ApiClient) -> None:
    """Until ps1's first heartbeat reached the catalog (30 s at most)."""
    async with asyncio.timeout(30):
        while True:
            try:
                await api.get("/api/v1/procservers/ps1")
                return
            except ApiCallError:
                await asyncio.sleep(0.2)
