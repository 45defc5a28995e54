"""Enable protection again (issue #14): on an agent that kept its maps after Disable
protection, the first cycle is a delta, and Enable protection ends with its point; and a
pushed agent counts only once it checks in at the version the push installed (where no
systemd restarts it, the old program may go on checking in)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from configserver.ca import write_bundle
from configserver.server import ConfigServer
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.enroll import enroll_with_passphrase
from mobility.siteclient import SiteClient
from procserver.config import ProcServerConfig
from siterecovery.apiclient import ApiClient
from siterecovery.tomlconfig import load
from tests.helpers import make_disk, make_vault, mutate, open_vault, restore_all, sha256
from tests.helpers import running_procserver as running
from tests.sitehelpers import AgentSite, next_job, step, wait_job

FACTS = {"os_name": "debian", "os_version": "12", "kernel": "6.1.0-18-amd64"}


async def _protected(api: ApiClient, jid: str) -> dict[str, Any]:
    """Enable protection ``jid`` and the Finalize protection it queues, both succeeded:
    the item."""
    job = await wait_job(api, jid, timeout=90)
    assert job["state"] == "succeeded", job
    fin = await next_job(api, "web01", "finalize_protection")
    assert (await wait_job(api, fin["id"], timeout=90))["state"] == "succeeded"
    item: dict[str, Any] = await api.get("/api/v1/items/web01")
    assert (item["state"], item["initial_progress"]) == ("protected", 100.0)
    return item


async def test_enable_protection_again_ends_with_the_delta_of_an_agent_that_kept_its_maps(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    url, key = await make_vault(tmp_path)
    tls = write_bundle(tmp_path / "ps-tls", "server",
                       cs.ca.issue_server("ps1", ["127.0.0.1", "localhost"]), cs.ca.cert_pem)
    pcfg = ProcServerConfig(
        data_dir=str(tmp_path / "ps"), vault_url=url, vault_key_file=str(key),
        tls_cert=str(tls[0]), tls_key=str(tls[1]), tls_ca=str(cs.ca.cert_path),
        listen_port=0, metrics_port=0, name="ps1", configserver_url=cs.site_url,
        configserver_token_file=str(cs.cfg.internal_token_path))
    disk = tmp_path / "disk.img"
    make_disk(disk, 4 << 20, seed=3)
    async with running(pcfg) as ps:
        async with asyncio.timeout(60), cs.changed:  # registered by its first heartbeat
            while not (await api.get("/api/v1/procservers"))["procservers"]:
                await cs.changed.wait()
        await api.post("/api/v1/machines", {
            "name": "web01", "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
            "os_version": "12", "disks": [{"name": "sda", "path": str(disk)}],
            "process_server": "ps1"})
        async with SiteClient(cs.site_url, str(cs.ca.cert_path)) as site:
            cfg_path = await enroll_with_passphrase(
                site, cs.passphrase, tmp_path / "agent", machine="web01",
                server_host="127.0.0.1", server_port=1, disks=[("sda", str(disk))])
        cfg = dataclasses.replace(load(MobilityConfig, cfg_path), snapshot="quiesced")
        async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as cp:
            managed = ManagedAgent(cfg, cp)
            try:
                job = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))
                assert await managed.round()  # the initial copy
                assert managed.last is not None and managed.last.kind == "full"
                first = await _protected(api, job["job"]["id"])

                off = (await api.post("/api/v1/replication/disable", {"machine": "web01"}))
                assert (await wait_job(api, off["job"]["id"]))["state"] == "succeeded"
                assert not await managed.round()  # not replicating; its maps stay
                mutate(disk, 0.05, seed=4)  # written while protection was off

                job = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))
                assert await managed.round()
                r = managed.last
                assert r is not None and r.kind == "delta"
                assert 0 < r.bytes_sent <= 0.07 * (4 << 20)  # not a second full copy
                again = sha256(disk)
                item = await _protected(api, job["job"]["id"])
                assert item["disks"] == {"sda": 100.0}
                point = await ps.wait_point(r.cycle)
                assert item["latest_point"] == point != first["latest_point"]
                ended = await api.get(f"/api/v1/jobs/{job['job']['id']}")
                assert step(ended, "initial_replication")["message"] == \
                    f"1 disk(s) copied; first recovery point {point}"
            finally:
                managed.close()
    vault = await open_vault(tmp_path / "vault", key)
    try:
        points = {p.id: p for p in await vault.list_points("web01")}
        assert points[point].cycle == r.cycle
        assert await restore_all(vault, points[point], tmp_path / "o") == {"sda": again}
    finally:
        await vault.close()


async def test_a_pushed_upgrade_counts_only_a_check_in_of_the_version_it_installed(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    async with ApiClient(cs.url, cs.internal_token) as internal:
        await internal.post("/api/v1/internal/procservers/heartbeat", {
            "name": "ps1", "address": "127.0.0.1:9443", "version": "0.2.0",
            "cache_bytes": 0, "cache_free_ratio": 1.0, "backlog_bytes": 0,
            "backlog_seconds": 0, "throughput_bps": 0, "sessions": 0})
        await api.post("/api/v1/accounts", {"name": "rootpw", "username": "root",
                                            "kind": "password", "secret": "pw-5"})
        await api.post("/api/v1/machines", {
            "name": "web01", "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
            "os_version": "12", "account": "rootpw", "process_server": "ps1",
            "disks": [{"name": "sda", "path": "/dev/sda"}]})
        agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01", cs.passphrase,
                                       tmp_path / "agent")
        async with agent:
            assert (await agent.heartbeat("0.1.0"))[0] == 200  # older than its server
            jid = (await api.post("/api/v1/replication/enable",
                                  {"machine": "web01"}))["job"]["id"]
            # The process server's side of the push, through its internal calls.
            path = "/api/v1/internal/procservers/ps1/install-requests"
            listed = await internal.get(path)
            while not listed["requests"]:
                listed = await internal.get(path, version=listed["version"], wait=20)
            (req,) = listed["requests"]
            assert (req["id"], req["action"]) == (jid, "upgrade")
            base = f"/api/v1/internal/install-requests/{jid}"
            await internal.post(f"{base}/claim", {"procserver": "ps1"})
            for name, extra in (("prerequisites", {"facts": FACTS}),
                                ("install", {"version": "0.2.0"}), ("enroll", {}),
                                ("start", {"how": "started by hand: no systemd",
                                           "running_before": False})):
                answer = await internal.post(f"{base}/report", {
                    "procserver": "ps1", "step": name, "state": "succeeded", **extra})
                assert answer["state"] in ("claimed", "done"), answer
            # No systemd restarted it: the old program checks in after the start.
            assert (await agent.heartbeat("0.1.0"))[0] == 200

            def waiting(j: dict[str, Any]) -> bool:
                s = step(j, "prepare_agent")
                return s["state"] != "running" or "not the 0.2.0 installed" in s["message"]

            job = await wait_job(api, jid, waiting)
            prep = step(job, "prepare_agent")
            assert prep["state"] == "running", job
            assert prep["message"].endswith(
                "not the 0.2.0 installed: restart it (started by hand: no systemd)")
            assert "\nagent 0.1.0 checked in at " in prep["message"]

            assert (await agent.heartbeat("0.2.0"))[0] == 200  # restarted: the new program
            job = await wait_job(api, jid, lambda j: step(j, "prepare_agent")["state"] !=
                                 "running" and step(j, "initial_replication")["state"] !=
                                 "pending")
            prep = step(job, "prepare_agent")
            assert prep["state"] == "succeeded", job
            assert prep["message"].splitlines()[-1].startswith("agent 0.2.0 checked in at ")
            assert step(job, "initial_replication")["state"] == "running"
    off = await api.post("/api/v1/replication/disable", {"machine": "web01"})
    assert (await wait_job(api, off["job"]["id"]))["state"] == "succeeded"
    assert (await api.get(f"/api/v1/jobs/{jid}"))["state"] == "cancelled"
