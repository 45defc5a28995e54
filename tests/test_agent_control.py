"""The agent's client of the site listener, against a real configuration server."""

from __future__ import annotations

from pathlib import Path

import pytest

from configserver.server import ConfigServer
from mobility.reporter import ProgressReporter
from mobility.siteclient import SiteClient, SiteRefused
from siterecovery.apiclient import ApiClient
from tests.sitehelpers import AgentSite, add_machine, add_procserver, step_running, wait_job


async def _enrolled(cs: ConfigServer, tmp_path: Path, name: str) -> SiteClient:
    site = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, name, cs.passphrase,
                                  tmp_path / "agent")
    assert site.cert is not None and site.key is not None
    return SiteClient(cs.site_url, str(cs.ca.cert_path), str(site.cert), str(site.key))


async def test_settings_heartbeat_and_progress(cs: ConfigServer, api: ApiClient,
                                               tmp_path: Path) -> None:
    await add_machine(api, "web01")
    await add_procserver(cs.url, cs.internal_token, "ps1", "127.0.0.1:9443")
    async with await _enrolled(cs, tmp_path, "web01") as control:
        s = await control.settings()
        assert not s.replicate and s.item_state is None
        assert [d["name"] for d in s.disks] == ["sda", "sdb"]
        job = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]
        await wait_job(api, job["id"], step_running("prepare_agent"))  # a server assigned
        s = await control.settings()
        assert s.replicate and s.process_server == "127.0.0.1:9443"
        policy = await api.get("/api/v1/policies/default")
        assert s.crash_interval_seconds == policy["crash_consistent_interval_seconds"]
        assert s.block_size == policy["block_size"]
        hb = await control.heartbeat()
        assert hb["machine"] == "web01"
        async with ProgressReporter(control, ["sda", "sdb"], resync=False, every=3600) as rep:
            rep("sda", 1, 4)
        item = await api.get("/api/v1/items/web01")
        assert item["state"] == "initial_replication"
        assert item["initial_progress"] == pytest.approx(100.0)


async def test_refusals_are_site_errors(cs: ConfigServer, api: ApiClient,
                                           tmp_path: Path) -> None:
    await add_machine(api, "db01")
    async with await _enrolled(cs, tmp_path, "db01") as control:
        with pytest.raises(SiteRefused, match="not_replicated") as e:
            await control.progress({"sda": 10.0})
        assert e.value.code == "not_replicated"
        await api.patch("/api/v1/machines/db01", {"enabled": False})
        with pytest.raises(SiteRefused, match="401") as e:
            await control.settings()
        assert e.value.status == 401
