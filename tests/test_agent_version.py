"""The agent's version on its item (issue #14): ``items show`` shows what the agent
reported, and an agent older than its process server is flagged with what to do."""

from __future__ import annotations

from pathlib import Path

from configserver.agentversion import older
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from siterecovery.replicationcmds import describe_item
from tests.sitehelpers import AgentSite, add_machine, step, wait_job

PS = {"address": "127.0.0.1:9443", "cache_bytes": 0, "cache_free_ratio": 1.0,
      "backlog_bytes": 0, "backlog_seconds": 0, "throughput_bps": 0, "sessions": 0}


async def _procserver(cs: ConfigServer, version: str) -> None:
    async with ApiClient(cs.url, cs.internal_token) as internal:
        await internal.post("/api/v1/internal/procservers/heartbeat",
                            {"name": "ps1", "version": version, **PS})


async def test_an_older_agent_is_flagged_on_its_item(cs: ConfigServer, api: ApiClient,
                                                     tmp_path: Path) -> None:
    await _procserver(cs, "0.2.0")
    await add_machine(api, "web01")
    job = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]
    # validate creates the item and assigns the process server
    await wait_job(api, job["id"], lambda j: step(j, "validate")["state"] == "succeeded")
    agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01", cs.passphrase,
                                   tmp_path / "agent")
    async with agent:
        await agent.heartbeat("0.1.9")
    item = await api.get("/api/v1/items/web01")
    assert item["agent"] == {"version": "0.1.9", "process_server": "ps1",
                             "process_server_version": "0.2.0", "outdated": True}
    assert item["health"] == "warning"
    assert any("agent 0.1.9 is older than process server ps1's 0.2.0" in e
               for e in item["health_errors"])
    assert "agent version:      0.1.9 (older than process server ps1's 0.2.0)" in \
        describe_item(item)
    listed = (await api.get("/api/v1/items"))["items"]
    assert [i["agent"]["outdated"] for i in listed] == [True]

    async with agent:
        await agent.heartbeat("0.2.0")  # upgraded
    item = await api.get("/api/v1/items/web01")
    assert item["agent"]["outdated"] is False and item["agent"]["version"] == "0.2.0"
    assert not any("older than process server" in e for e in item["health_errors"])
    assert "agent version:      0.2.0\n" in describe_item(item)


def test_versions_compare_by_their_numbers() -> None:
    assert older("0.9.1", "0.10.0") and older("1", "1.0.1") and not older("1.0", "1.0.0")
    assert not older("0.2.0", "0.1.9") and not older("2.0", "2.0")
    # not a version: never flagged on a guess
    assert not older("dev", "1.0") and not older("1.0", "test") and not older("", "1.0")
