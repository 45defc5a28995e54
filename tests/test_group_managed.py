"""A consistency group through the control plane, every part real: a configuration server,
a process server registered with it, two machines enrolled with the passphrase and
replicating, each with its managed agent. The agents learn their group from their
settings; when the group's interval begins they take their cycle through the process
server's barrier, and the process server reports the group point, which the catalog lists
as complete once both members' points are in it."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from configserver.server import ConfigServer
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.enroll import enroll_with_passphrase
from mobility.siteclient import SiteClient
from procserver.config import ProcServerConfig
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from siterecovery.tomlconfig import load
from tests.helpers import make_disk, make_vault
from tests.managedsite import _registered, issue_procserver_cert

MEMBERS = ("app01", "db01")
INTERVAL = 600


async def _agent(cs: ConfigServer, api: ApiClient, tmp: Path, m: str) -> MobilityConfig:
    disk = tmp / f"{m}.img"
    make_disk(disk, 4 << 20, seed=len(m))
    await api.post("/api/v1/machines", {
        "name": m, "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
        "os_version": "12", "disks": [{"name": "sda", "path": str(disk)}],
        "process_server": "ps1"})
    async with SiteClient(cs.site_url, str(cs.ca.cert_path)) as enrolling:
        cfg_path = await enroll_with_passphrase(
            enrolling, cs.passphrase, tmp / f"agent-{m}", machine=m,
            server_host="127.0.0.1", server_port=1, disks=[("sda", str(disk))])
    await api.post("/api/v1/replication/enable", {"machine": m})
    return dataclasses.replace(load(MobilityConfig, cfg_path), snapshot="quiesced")


async def test_managed_members_meet_at_the_barrier_when_the_interval_begins(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    url, key = await make_vault(tmp_path)
    tls = tmp_path / "ps-tls"
    await issue_procserver_cert(api, tls)
    ps = ProcServer(ProcServerConfig(
        data_dir=str(tmp_path / "ps"), vault_url=url, vault_key_file=str(key),
        tls_cert=str(tls / "server.pem"), tls_key=str(tls / "server.key"),
        tls_ca=str(cs.ca.cert_path), listen_port=0, metrics_port=0, name="ps1",
        configserver_url=cs.site_url,
        configserver_token_file=str(cs.cfg.internal_token_path)))
    await ps.start()
    wall = [INTERVAL * 3_000_000 + 17.0]  # the agents' wall clock, moved by the test
    managed: list[ManagedAgent] = []
    clients: list[SiteClient] = []
    try:
        await _registered(cs, api)
        cfgs = [await _agent(cs, api, tmp_path, m) for m in MEMBERS]
        await api.post("/api/v1/groups", {"name": "erp", "members": list(MEMBERS),
                                          "interval_seconds": INTERVAL,
                                          "barrier_timeout_seconds": 60})
        for cfg in cfgs:
            client = SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
            await client.__aenter__()
            clients.append(client)
            managed.append(ManagedAgent(cfg, client, wall=lambda: wall[0]))
        # the interval the daemons start in: ordinary cycles (the initial copies)
        assert all(await asyncio.gather(*(a.round() for a in managed)))
        for a in managed:
            assert a.settings is not None and a.settings.group is not None
            assert a.settings.group["members"] == list(MEMBERS)
            assert a.agent.last_group is None
        # the next interval begins: both members' cycles go through the barrier
        wall[0] += INTERVAL
        assert all(await asyncio.gather(*(a.round() for a in managed)))
        cycles, point = {}, None
        for m, a in zip(MEMBERS, managed, strict=True):
            got = a.agent.last_group
            assert got is not None and got.released, got
            assert a.last is not None and got.cycle == a.last.cycle
            cycles[m], point = got.cycle, got.point
        # a round later in the same interval takes no group point
        assert all(await asyncio.gather(*(a.round() for a in managed)))
        assert all(a.last is not None and a.last.cycle not in cycles.values()
                   for a in managed)
        assert list(ps.barriers.outcomes) == [point]

        async def complete() -> list[dict[str, Any]]:
            async with asyncio.timeout(120), cs.changed:
                while True:
                    pts = (await api.get("/api/v1/groups/erp/points"))["points"]
                    if pts and pts[0]["state"] == "complete":
                        return list(pts)
                    await cs.changed.wait()

        [gp] = await complete()
        assert gp["id"] == point
        assert {m["machine"]: m["cycle"] for m in gp["members"]} == cycles
        assert all(m["point"] for m in gp["members"])
    finally:
        for a in managed:
            a.close()
        for c in clients:
            await c.__aexit__(None, None, None)
        await ps.stop()
