"""An agent acts at once on what its settings ask, not at its next pull a minute later
(configserver/agentwatch.py, mobility/daemon.py): the real configuration server, its site
listener and a ManagedAgent pausing for an hour; the long poll's answers and refusals;
the digest moves with exactly what the agent acts on."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from configserver import db
from configserver.agentwatch import digest
from configserver.server import ConfigServer
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.enroll import enroll_with_passphrase
from mobility.siteclient import SiteClient
from siterecovery.apiclient import ApiClient
from siterecovery.tomlconfig import load
from tests.sitehelpers import AgentSite, add_machine, add_procserver, sqlite_configserver

CHANGES = "/api/v1/agent/settings/changes"


async def _enrolled(cs: ConfigServer, api: ApiClient, tmp: Path) -> MobilityConfig:
    await add_procserver(cs.url, cs.internal_token)
    await api.post("/api/v1/machines", {
        "name": "web01", "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
        "os_version": "12", "disks": [{"name": "sda", "path": str(tmp / "disk.img")}],
        "process_server": "ps1"})
    async with SiteClient(cs.site_url, str(cs.ca.cert_path)) as site:
        path = await enroll_with_passphrase(site, cs.passphrase, tmp / "agent",
                                            machine="web01", server_host="127.0.0.1",
                                            server_port=1,
                                            disks=[("sda", str(tmp / "disk.img"))])
    return dataclasses.replace(load(MobilityConfig, path), snapshot="quiesced")


async def test_a_pausing_agent_takes_up_replication_as_soon_as_it_is_enabled(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    cfg = await _enrolled(cs, api, tmp_path)
    async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as site:
        managed = ManagedAgent(cfg, site)
        pause: asyncio.Task[None] | None = None
        try:
            assert not await managed.round()  # not enabled: no cycle
            assert managed.settings is not None and managed.settings.digest
            before = managed.settings.digest
            pause = asyncio.create_task(managed.pause(3600))  # the next round in an hour
            await api.post("/api/v1/replication/enable", {"machine": "web01"})
            # Its settings pull would come after the heartbeat interval (60 s): the long
            # poll ends the pause well before.
            async with asyncio.timeout(40):
                await pause
            assert managed.settings.replicate and managed.settings.digest != before
        finally:
            if pause is not None:
                pause.cancel()
            managed.close()


async def test_the_long_poll_answers_and_refuses(cs: ConfigServer, api: ApiClient,
                                                 tmp_path: Path) -> None:
    await add_procserver(cs.url, cs.internal_token)
    await add_machine(api, "web01", ("sda",))
    agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01", cs.passphrase,
                                   tmp_path / "agent")
    async with agent:
        status, settings = await agent.call("GET", "/api/v1/agent/settings")
        assert status == 200
        now = settings["digest"]
        assert await agent.call("GET", f"{CHANGES}?since={now}&wait=0.1") == (
            200, {"digest": now})  # unchanged: after the wait, the same digest
        assert await agent.call("GET", CHANGES) == (200, {"digest": now})  # no since: at once
        for bad in ("wait=56", "wait=-1", "wait=x", f"since={'a' * 65}"):
            status, doc = await agent.call("GET", f"{CHANGES}?{bad}")
            assert (status, doc["error"]["code"]) == (400, "bad_query"), bad
    async with AgentSite(cs.site_url, cs.ca.cert_path) as anonymous:  # no certificate
        assert (await anonymous.call("GET", CHANGES))[0] == 401



async def test_a_stopping_server_answers_its_waiting_long_polls_at_once(
        tmp_path: Path) -> None:
    """A stop lets requests in progress finish within a grace period (60 s): agents'
    long polls are answered at once instead of holding every stop for their wait."""
    async with sqlite_configserver(tmp_path, site_port=0) as cs:  # (stopped again on leaving)
        async with ApiClient(cs.url, cs.admin_token) as api:
            await add_procserver(cs.url, cs.internal_token)
            await add_machine(api, "web01", ("sda",))
        agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01",
                                       cs.passphrase, tmp_path / "agent")
        async with agent:
            since = (await agent.call("GET", "/api/v1/agent/settings"))[1]["digest"]
            poll = asyncio.create_task(agent.call("GET", f"{CHANGES}?since={since}&wait=50"))
            watch = cs.services.agent_watch
            async with asyncio.timeout(30), watch.changed:  # until the server holds it
                await watch.changed.wait_for(lambda: watch.waiting == 1)
            async with asyncio.timeout(30):  # well within the poll's 50 s
                await cs.stop()
                assert await poll == (200, {"digest": since})


def test_the_digest_moves_with_what_the_agent_acts_on() -> None:
    item = db.ReplicatedItem(machine="web01", policy="default", state="protected",
                             failover=None)
    seen = {digest(None), digest(item)}
    for state, failover in (("initial_replication", None), ("resync_required", None),
                            ("failover_in_progress", None),
                            ("failover_in_progress", {"shutdown": {"request": "r1"}}),
                            ("failback_in_progress", {"failback": {"request": "f1",
                                                                   "point": "p1"}})):
        item.state, item.failover = state, failover
        seen.add(digest(item))
    assert len(seen) == 7
    # what the agent does not act on leaves it: a shutdown request it answered
    item.state, item.failover = "failover_in_progress", None
    asked_nothing = digest(item)
    item.failover = {"shutdown": {"request": "r1", "reported": True}}
    assert digest(item) == asked_nothing
