"""A process server killed with SIGKILL around a consistency group's point: a real
``siterecovery procserver run`` in a subprocess, the real configuration server behind a
TCP proxy the test can stall, two enrolled machines with their managed agents.

1. Both members pass the barrier while the configuration server cannot be reached from
   the process server, which is killed before it could report the group point. The
   restarted process server sends the report from its database: the catalog lists the
   group point with both members' cycles, and it completes.
2. One member waits at a barrier when the process server is killed: the restarted one
   fails that group point with the reason (the event ``group_point_failed``), and the
   member's own cycle goes on through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import pytest

from configserver.server import ConfigServer
from mobility.daemon import ManagedAgent
from mobility.siteclient import SiteClient
from procserver.groupoutbox import RESTARTED
from siterecovery.apiclient import ApiClient
from tests.helpers import Daemon, make_vault, write_toml
from tests.managedsite import _registered, issue_procserver_cert
from tests.test_group_managed import INTERVAL, MEMBERS, _agent
from tests.test_resume import Proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _points(cs: ConfigServer, api: ApiClient, want: Any) -> list[dict[str, Any]]:
    """The group's points once ``want(points)`` holds (woken by the catalog's changes)."""
    async with asyncio.timeout(120), cs.changed:
        while True:
            pts: list[dict[str, Any]] = (await api.get("/api/v1/groups/erp/points"))["points"]
            if want(pts):
                return pts
            await cs.changed.wait()


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_group_point_reports_survive_a_kill9_of_the_process_server(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    url, key = await make_vault(tmp_path)
    tls = tmp_path / "ps-tls"
    await issue_procserver_cert(api, tls)
    async with Proxy(cs.site_port) as proxy:
        toml = write_toml(tmp_path / "ps1.toml", {
            "data_dir": str(tmp_path / "ps"), "vault_url": url, "vault_key_file": str(key),
            "tls_cert": str(tls / "server.pem"), "tls_key": str(tls / "server.key"),
            "tls_ca": str(cs.ca.cert_path), "listen_port": _free_port(), "metrics_port": 0,
            "name": "ps1", "configserver_url": f"https://127.0.0.1:{proxy.port}",
            "configserver_token_file": str(cs.cfg.internal_token_path),
            "heartbeat_interval_seconds": 0.5})
        ps = Daemon(["procserver", "run", "--config", str(toml)], "procserver_started")
        await ps.start()
        wall = [INTERVAL * 3_000_000 + 17.0]
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
            assert all(await asyncio.gather(*(a.round() for a in managed)))

            # 1. released while the catalog is out of reach, then SIGKILL
            proxy.target_port = _free_port()  # nothing listens there: connections reset
            proxy.reset_all()
            wall[0] += INTERVAL
            assert all(await asyncio.gather(*(a.round() for a in managed)))
            cycles = {}
            for m, a in zip(MEMBERS, managed, strict=True):
                got = a.agent.last_group
                assert got is not None and got.released, got
                cycles[m] = got.cycle
            point = managed[0].agent.last_group.point  # type: ignore[union-attr]
            assert ps.events("group_point_released") and not ps.events("group_point_reported")
            await ps.kill9()
            proxy.target_port = cs.site_port
            assert (await api.get("/api/v1/groups/erp/points"))["points"] == []
            ps = Daemon(["procserver", "run", "--config", str(toml)], "procserver_started")
            await ps.start()
            [gp] = await _points(cs, api, lambda p: p and p[0]["state"] == "complete")
            assert gp["id"] == point
            assert {m["machine"]: m["cycle"] for m in gp["members"]} == cycles
            [sent] = await ps.wait_events("group_point_reported", 1)
            assert sent["group_point"] == point and sent["state"] == "released"

            # 2. SIGKILL while a member waits at the barrier
            wall[0] += INTERVAL
            waiting = asyncio.create_task(managed[0].round())  # db01 never comes
            arrived = len(ps.events("barrier_arrived"))
            await ps.wait_events("barrier_arrived", arrived + 1)
            await ps.kill9()
            ps = Daemon(["procserver", "run", "--config", str(toml)], "procserver_started")
            await ps.start()
            # app01's gate failed with the connection; its cycle's connection went too: the
            # daemon's next round replicates through the restarted server
            with contextlib.suppress(OSError):
                await waiting
            got = managed[0].agent.last_group
            assert got is not None and not got.released, got
            assert await managed[0].round()
            pts = await _points(cs, api, lambda p: len(p) == 2)
            assert pts[1]["id"] == got.point and pts[1]["state"] == "failed"
            assert pts[1]["error"] == RESTARTED
            events = (await api.get("/api/v1/events", code="group_point_failed"))["events"]
            assert [e["target"] for e in events] == ["group:erp"]
            assert got.point in events[0]["message"] and RESTARTED in events[0]["message"]
        finally:
            for a in managed:
                a.close()
            for c in clients:
                await c.__aexit__(None, None, None)
            if ps.proc is not None and ps.proc.returncode is None:
                await ps.stop()
