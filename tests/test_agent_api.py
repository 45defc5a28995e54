"""The agent routes on the site listener (mutual TLS, the machine's enrolled certificate),
on SQLite and PostgreSQL: settings, heartbeat, progress; who may call them; bad input
changes nothing; resynchronization."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from configserver.agentwatch import digest
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from tests.sitehelpers import (
    AgentSite,
    add_machine,
    add_procserver,
    next_job,
    report_point,
    step_running,
    wait_job,
)


async def _enrolled(cs: ConfigServer, api: ApiClient, tmp_path: Path, name: str = "web01"
                    ) -> AgentSite:
    await add_machine(api, name)
    return await AgentSite.enroll(cs.site_url, cs.ca.cert_path, name, cs.passphrase,
                                  tmp_path / "agent")


async def _protected(cs: ConfigServer, api: ApiClient, agent: AgentSite) -> None:
    await add_procserver(cs.url, cs.internal_token)
    jid = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]["id"]
    await agent.heartbeat()
    await agent.progress({"sda": 100, "sdb": 100})
    await report_point(cs.url, cs.internal_token, "web01", "1" * 64)
    assert (await wait_job(api, jid))["state"] == "succeeded"
    fin = await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
    assert fin["state"] == "succeeded"


async def test_settings_and_heartbeat(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    async with await _enrolled(cs, api, tmp_path) as agent:
        status, settings = await agent.settings()
        assert status == 200
        assert settings == {
            "machine": "web01", "replicate": False, "item_state": None,
            "resync_required": False,
            "disks": [{"name": "sda", "path": "/dev/sda", "size_bytes": 1 << 30},
                      {"name": "sdb", "path": "/dev/sdb", "size_bytes": 1 << 30}],
            "process_server": None, "policy": None,
            "bandwidth": None, "revoked_server_certificates": [],
            "server_revocation_list": None,
            "heartbeat_interval_seconds": 60, "shutdown_request": None,
            "failback_request": None, "group": None, "role": "original",
            "basis_point": None, "digest": digest(None)}  # no item
        machine = await api.get("/api/v1/machines/web01")
        assert machine["last_contact"] is not None  # the settings call is a check-in

        status, hb = await agent.heartbeat("3.1.4")
        assert status == 200
        assert hb["machine"] == "web01" and hb["replicate"] is False
        machine = await api.get("/api/v1/machines/web01")
        assert machine["agent_version"] == "3.1.4" and machine["last_contact"] == \
            hb["last_contact"]

        for body in ({}, {"agent_version": ""}, {"agent_version": "x" * 41},
                     {"agent_version": "1", "machine": "other"}, [1]):
            status, err = await agent.call("POST", "/api/v1/agent/heartbeat", body)
            assert (status, err["error"]["code"]) == (422, "invalid_request"), body
        assert (await api.get("/api/v1/machines/web01"))["agent_version"] == "3.1.4"


async def test_who_may_call(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    agent = await _enrolled(cs, api, tmp_path)
    anonymous = AgentSite(cs.site_url, cs.ca.cert_path)
    async with anonymous:
        for method, path, body in (("GET", "/api/v1/agent/settings", None),
                                   ("POST", "/api/v1/agent/heartbeat", {"agent_version": "1"}),
                                   ("POST", "/api/v1/agent/progress", {"disks": {"sda": 1}})):
            status, err = await anonymous.call(method, path, body)
            assert (status, err["error"]["code"]) == (401, "unauthorized"), path
    # not on the admin listener, even with the admin token
    async with aiohttp.ClientSession() as http, http.get(
            f"{cs.url}/api/v1/agent/settings",
            headers={"Authorization": f"Bearer {cs.admin_token}"}) as r:
        assert r.status in (404, 405)
    # a certificate from another CA does not get through TLS
    from configserver.ca import CertificateAuthority, write_bundle

    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    write_bundle(tmp_path / "forged", "agent", other.issue_client("web01"), other.cert_pem)
    forged = AgentSite(cs.site_url, cs.ca.cert_path, tmp_path / "forged" / "agent.pem",
                       tmp_path / "forged" / "agent.key")
    async with forged:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await forged.heartbeat()
    # a disabled machine, then a revoked certificate, are refused
    async with agent:
        assert (await agent.heartbeat("1.0"))[0] == 200
        await api.patch("/api/v1/machines/web01", {"enabled": False})
        assert (await agent.heartbeat("2.0"))[0] == 401
        await api.patch("/api/v1/machines/web01", {"enabled": True})
        assert (await agent.heartbeat("2.0"))[0] == 200
        certs = (await api.get("/api/v1/certificates"))["certificates"]
        (serial,) = [c["serial"] for c in certs if c["subject"] == "web01"]
        await api.post(f"/api/v1/certificates/{serial}/revoke")
        assert (await agent.heartbeat("3.0"))[0] == 401
    assert (await api.get("/api/v1/machines/web01"))["agent_version"] == "2.0"


async def test_progress_refusals_change_nothing(cs: ConfigServer, api: ApiClient,
                                                tmp_path: Path) -> None:
    async with await _enrolled(cs, api, tmp_path) as agent:
        status, err = await agent.progress({"sda": 10})
        assert (status, err["error"]["code"]) == (409, "not_replicated")
        await add_procserver(cs.url, cs.internal_token)
        jid = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]["id"]
        await agent.heartbeat()
        await wait_job(api, jid, step_running("initial_replication"))
        status, item = await agent.progress({"sda": 40})
        assert status == 200 and item["disks"] == {"sda": 40.0}
        assert item["initial_progress"] == 20.0
        before = await api.get("/api/v1/items/web01")

        status, err = await agent.progress({"sda": 50, "sdz": 10})
        assert (status, err["error"]["code"]) == (422, "unknown_disk")
        assert "sdz" in err["error"]["message"]
        bad: list[Any] = [{"disks": {}}, {"disks": {"sda": 101}}, {"disks": {"sda": -1}},
                          {"disks": {"sda": "50"}}, {"disks": {"../x": 5}},
                          {"disks": {"sda": 5}, "resync": "yes"},
                          {"disks": {"sda": 5}, "other": 1}, {}]
        for body in bad:
            status, err = await agent.call("POST", "/api/v1/agent/progress", body)
            assert (status, err["error"]["code"]) == (422, "invalid_request"), body
        assert await api.get("/api/v1/items/web01") == before
        # a resync flag during initial replication is still initial progress
        status, item = await agent.progress({"sdb": 60}, resync=True)
        assert item["state"] == "initial_replication" and item["initial_progress"] == 50.0
        assert item["resync_progress"] is None


async def test_resynchronization(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    async with await _enrolled(cs, api, tmp_path) as agent:
        await _protected(cs, api, agent)
        status, settings = await agent.settings()
        assert settings["replicate"] is True and settings["item_state"] == "protected"
        status, item = await agent.progress({"sda": 30}, resync=True)
        assert status == 200
        assert item["state"] == "resyncing" and item["resync_progress"] == 15.0
        assert item["disks"] == {"sda": 30.0}  # a resync starts every disk from 0 %
        assert item["initial_progress"] == 100.0
        status, item = await agent.progress({"sda": 100, "sdb": 90})
        assert item["state"] == "resyncing" and item["resync_progress"] == 95.0
        status, item = await agent.progress({"sdb": 100}, resync=True)
        assert item["state"] == "protected" and item["resync_progress"] is None
        # progress while protected (delta cycles) does not change the state
        status, item = await agent.progress({"sda": 50})
        assert item["state"] == "protected"
        assert (await api.get("/api/v1/items/web01"))["state"] == "protected"


def _report(missed: int) -> dict[str, Any]:
    return {"agent_version": "1", "trackers": {
        "sda": {"tracker": "blocktrace", "verified_at": 1_800_000_000.0, "missed_blocks": missed},
        "sdb": {"tracker": "scan", "verified_at": None, "missed_blocks": 0}}}


async def test_a_tracker_that_missed_writes_raises_an_alert_until_verified_whole(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    async with await _enrolled(cs, api, tmp_path) as agent:
        assert (await agent.call("POST", "/api/v1/agent/heartbeat", _report(3)))[0] == 200
        active = (await api.post("/api/v1/alerts/evaluate", {}))["events"]
        [alert] = [e for e in active if e["code"] == "tracker_missed_writes"]
        assert (alert["target"], alert["severity"]) == ("web01", "critical")
        assert "sda (3 blocks, blocktrace tracker, verified 2027-01-15T08:00:00Z)" in \
            alert["message"] and "sdb" not in alert["message"]

        for bad in ({"sda": {"tracker": "blocktrace", "verified_at": None,
                             "missed_blocks": -1}},
                    {"sda": {"tracker": "Block Trace", "verified_at": None,
                             "missed_blocks": 0}},
                    {"sda": {"tracker": "scan", "verified_at": None}},
                    {"../x": {"tracker": "scan", "verified_at": None, "missed_blocks": 0}},
                    {f"d{i}": {"tracker": "scan", "verified_at": None, "missed_blocks": 0}
                     for i in range(65)}):
            status, err = await agent.call("POST", "/api/v1/agent/heartbeat",
                                           {"agent_version": "1", "trackers": bad})
            assert (status, err["error"]["code"]) == (422, "invalid_request"), bad
        # refused reports changed nothing: still raised
        active = (await api.post("/api/v1/alerts/evaluate", {}))["events"]
        assert any(e["code"] == "tracker_missed_writes" for e in active)

        assert (await agent.call("POST", "/api/v1/agent/heartbeat", _report(0)))[0] == 200
        active = (await api.post("/api/v1/alerts/evaluate", {}))["events"]
        assert not any(e["code"] == "tracker_missed_writes" for e in active)
        cleared = (await api.get("/api/v1/events", code="tracker_missed_writes"))["events"]
        assert [(e["active"], e["cleared_at"] is not None) for e in cleared] == [(False, True)]
