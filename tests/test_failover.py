"""Failover through the real configuration server (SQLite and PostgreSQL), a real vault
with real points and the folder target: a drill and its cleanup (of the newest point,
a named one, the newest app-consistent one), failover, change of recovery point, commit
(REST and CLI), verbs refused in the wrong state, a drill cancelled while its
restore waits or inside the target's create. (kill -9 of the server during a failover:
``test_failover_kill9.py``.)"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from targets.base import RecoveryDisk, RecoverySpec
from targets.folder import FolderTarget
from tests.cpshim import cp_shim, cp_stops, kill_stopped
from tests.failoversite import DISK, disk_data, ext4_disk, protect, register, sha256_of
from tests.helpers import (
    run_cli,
    sha256,
    write_full_point,
)
from tests.sitehelpers import (
    AgentSite,
    report_point,
    step,
    wait_job,
)
from vault.locks import Lock, try_acquire
from vault.point import Point
from vault.repo import Vault


@dataclass
class Site:
    api: ApiClient
    url: str
    internal: str
    vault: Vault
    points: list[Point]
    data: dict[str, bytes]  # point id -> the disk's bytes
    recovered: Path  # the folder target's root
    agent: AgentSite  # web01's agent (its settings say whether to replicate)


@pytest.fixture
async def site(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> AsyncIterator[Site]:
    vault = await register(api, tmp_path)
    try:
        points, data = await protect(api, cs.url, cs.site_url, cs.internal_token,
                                      cs.ca.cert_path, cs.passphrase, tmp_path, vault)
        agent = AgentSite(cs.site_url, cs.ca.cert_path, tmp_path / "agent" / "web01.pem",
                          tmp_path / "agent" / "web01.key")
        yield Site(api, cs.url, cs.internal_token, vault, points, data,
                   Path(cs.cfg.data_dir) / "recovered", agent)
    finally:
        await vault.close()


async def _run(api: ApiClient, verb: str, body: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    job = (await api.post(f"/api/v1/items/web01/{verb}", body or {}))["job"]
    done: dict[str, Any] = await wait_job(api, job["id"])
    return done


async def _refused(api: ApiClient, verb: str, body: dict[str, Any] | None = None) -> str:
    with pytest.raises(ApiCallError) as e:
        await api.post(f"/api/v1/items/web01/{verb}", body or {})
    assert e.value.status == 409, e.value
    return e.value.message


def _recovered_is(site: Site, point: Point, *, drill: bool) -> None:
    folder = site.recovered / "web01"
    assert sorted(p.name for p in folder.iterdir()) == ["sda.img", "vm.json"]
    assert sha256(folder / "sda.img") == sha256_of(site.data[point.id])
    vm = json.loads((folder / "vm.json").read_text())
    assert vm == {"name": "web01", "machine": "web01", "cpus": 2, "memory_mib": 2048,
                  "firmware": "bios", "network": "drill-net" if drill else "prod-net",
                  "ip": "192.0.2.50", "mac": "52:54:00:00:00:01", "drill": drill,
                  "boot_marker": None, "point": point.id,
                  "disks": [{"name": "sda", "file": "sda.img", "size": DISK,
                             "format": "raw"}]}


async def _settings(api: ApiClient) -> None:
    await api.call("PATCH", "/api/v1/items/web01/recovery", {
        "cpus": 2, "memory_mib": 2048, "network": "prod-net", "drill_network": "drill-net",
        "ip": "192.0.2.50", "mac": "52:54:00:00:00:01"}, {})


async def test_drill_on_the_folder_target_then_cleanup(site: Site, cs: ConfigServer) -> None:
    api = site.api
    await _settings(api)
    p1, p2 = site.points
    job = await _run(api, "test-failover")
    assert job["state"] == "succeeded", job
    assert [s["name"] for s in job["steps"]] == [
        "prerequisites", "select_point", "restore", "verify", "create", "boot", "record"]
    assert p2.id in step(job, "select_point")["message"]  # latest-processed: the newest
    assert "cannot boot machines" in step(job, "boot")["message"]
    _recovered_is(site, p2, drill=True)
    async with site.agent:  # a drill leaves production alone: replication goes on
        assert (await site.agent.settings())[1]["replicate"] is True
    item = await api.get("/api/v1/items/web01")
    drill = item["last_drill"]
    assert item["state"] == "test_failover_done"
    assert (drill["job"], drill["point"], drill["result"], drill["target"]) == (
        job["id"], p2.id, "succeeded", "folder")
    assert isinstance(drill["rto_seconds"], float) and drill["rto_seconds"] >= 0
    [fs] = drill["checks"]["sda"]["checks"]  # e2fsck -fn on the restored disk
    assert drill["checks"]["sda"]["ok"] is True and drill["checks"]["sda"]["table"] == "none"
    assert (fs["fs"], fs["status"]) == ("ext4", "clean")
    assert "sda: ext4 clean" in step(job, "verify")["message"]
    assert drill["recovered"]["resources"] == [f"folder:{site.recovered / 'web01'}"]
    assert drill["work"] is None  # the restored images went once the target had its copy
    assert not any((Path(cs.cfg.data_dir) / "failover-work").iterdir())

    # wrong states: a second drill, a failover, a commit before cleanup
    await _refused(api, "commit")
    await _refused(api, "test-failover")
    await _refused(api, "failover")
    with pytest.raises(ApiCallError) as e:  # notes are required
        await api.post("/api/v1/items/web01/cleanup-test-failover", {"notes": " "})
    assert e.value.status == 422 and e.value.api_code == "notes_required"

    done = await _run(api, "cleanup-test-failover", {"notes": "web01 came up; app checked"})
    assert done["state"] == "succeeded", done
    assert not (site.recovered / "web01").exists()
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "protected"
    assert item["last_drill"]["notes"] == "web01 came up; app checked"
    assert item["last_drill"]["cleanup_job"] == done["id"]
    await _refused(api, "cleanup-test-failover", {"notes": "again"})  # nothing to clean

    # a drill of a named older point (id prefix), and one before any point: it fails,
    # made nothing, and the item is protected again
    job = await _run(api, "test-failover", {"point": p1.id[:12]})
    assert job["state"] == "succeeded", job
    _recovered_is(site, p1, drill=True)
    await _run(api, "cleanup-test-failover", {"notes": "older point"})
    job = await _run(api, "test-failover", {"at": "2000-01-01T00:00:00Z"})
    assert job["state"] == "failed" and "no recovery point matches" in job["error"]
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "protected" and item["last_drill"]["result"] == "failed"

    # latest-app-consistent: the newest app-consistent point, though a crash-consistent
    # one came after it; the job and the item record the point it used
    app = await write_full_point(site.vault, site.data[p1.id], machine="web01", cycle="c2",
                                 consistency="app")
    crash = await write_full_point(site.vault, site.data[p2.id], machine="web01", cycle="c3")
    for p in (app, crash):
        await report_point(site.url, site.internal, "web01", p.id, p.created, p.consistency)
    assert crash.created > app.created and crash.consistency == "crash"
    site.data[app.id] = site.data[p1.id]
    job = await _run(api, "test-failover", {"point": "latest-app-consistent"})
    assert job["state"] == "succeeded", job
    assert job["params"]["point"] == "latest-app-consistent"
    assert f"point {app.id} (app-consistent" in step(job, "select_point")["message"]
    _recovered_is(site, app, drill=True)
    drill = (await api.get("/api/v1/items/web01"))["last_drill"]
    assert (drill["job"], drill["point"], drill["consistency"]) == (job["id"], app.id, "app")


async def test_a_drill_of_a_damaged_point_fails_with_the_fsck_findings(
        site: Site, cs: ConfigServer, tmp_path: Path) -> None:
    api = site.api
    bad = await write_full_point(site.vault, ext4_disk(tmp_path / "bad", 9, damaged=True),
                                 machine="web01", cycle="c9")
    await report_point(site.url, site.internal, "web01", bad.id, bad.created, bad.consistency)
    job = await _run(api, "test-failover")
    assert job["state"] == "failed" and step(job, "verify")["state"] == "failed", job
    assert bad.id in step(job, "select_point")["message"]
    assert "disk sda: partition 0 (ext4) damaged" in job["error"]
    assert re.search(r"\(exit status (4|8|12)\)", job["error"]), job["error"]
    item = await api.get("/api/v1/items/web01")
    drill = item["last_drill"]
    assert item["state"] == "test_failover_done"  # the restored disk is there to clean up
    assert (drill["result"], drill["checks"]["sda"]["ok"]) == ("failed", False)
    assert drill["checks"]["sda"]["checks"][0]["status"] == "damaged"
    assert drill.get("recovered") is None and not (site.recovered / "web01").exists()
    work = Path(drill["work"])
    assert work.is_dir()
    done = await _run(api, "cleanup-test-failover", {"notes": "point c9 is damaged"})
    assert done["state"] == "succeeded", done
    assert not work.exists()
    assert (await api.get("/api/v1/items/web01"))["state"] == "protected"


async def test_a_cancelled_drill_leaves_its_work_for_cleanup(
        site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = site.api
    got = await try_acquire(site.vault, "exclusive", "test: a prune")  # the restore waits
    assert isinstance(got, Lock)
    try:
        jid = (await api.post("/api/v1/items/web01/test-failover", {}))["job"]["id"]
        await wait_job(api, jid, lambda j: "after a prune" in step(j, "restore")["message"])
        assert (await api.post(f"/api/v1/jobs/{jid}/cancel", {}))["state"] == "cancelled"
    finally:
        await got.release()
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "test_failover_done" and item["last_drill"]["result"] == "cancelled"
    done = await _run(api, "cleanup-test-failover", {"notes": "cancelled drill"})
    assert done["state"] == "succeeded", done
    assert not Path(item["last_drill"]["work"]).exists()
    assert (await api.get("/api/v1/items/web01"))["state"] == "protected"

    # cancelled inside the target's create (its cp stopped part way), before it could
    # say what it made: what it planned is cleaned up
    for name, value in cp_shim(tmp_path / "cp-shim").items():
        monkeypatch.setenv(name, value)
    folder = site.recovered / "web01"
    pid = None
    try:
        async with cp_stops(tmp_path / "cp-shim") as told:
            jid = (await api.post("/api/v1/items/web01/test-failover", {}))["job"]["id"]
            pid = await asyncio.wait_for(told, 120)
        assert (folder.with_name("web01.partial") / "sda.img").stat().st_size == 65536
        assert (await api.post(f"/api/v1/jobs/{jid}/cancel", {}))["state"] == "cancelled"
    finally:
        if pid is not None:
            kill_stopped(pid)
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "test_failover_done"
    assert item["last_drill"]["planned"]["resources"] == [f"folder:{folder}"]
    done = await _run(api, "cleanup-test-failover", {"notes": "cancelled in create"})
    assert done["state"] == "succeeded", done
    assert f"folder:{folder}" in step(done, "cleanup")["message"]
    assert list(site.recovered.iterdir()) == []


async def test_failover_change_point_and_commit(site: Site) -> None:
    api = site.api
    await _settings(api)
    p1, p2 = site.points
    await _refused(api, "commit")  # not failed over
    await _refused(api, "change-recovery-point")
    # a failover that fails before it made anything gives the item back (replication on)
    await api.call("PATCH", "/api/v1/items/web01/recovery", {"target": "libvirt"}, {})
    job = await _run(api, "failover")
    assert job["state"] == "failed" and step(job, "prerequisites")["state"] == "failed"
    assert "recovery target 'libvirt' is not available" in job["error"]
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "protected" and item["failover"]["result"] == "failed"
    await api.call("PATCH", "/api/v1/items/web01/recovery", {"target": None}, {})
    job = await _run(api, "failover", {"shutdown_source": True,
                                       "shutdown_timeout_seconds": 1})
    assert job["state"] == "succeeded", job
    assert job["cancellable"] is False
    assert "did not answer within 1 s" in step(job, "shutdown_source")["message"]
    assert "no longer ask it to replicate" in step(job, "stop_replication")["message"]
    _recovered_is(site, p2, drill=False)
    async with site.agent:  # replication stopped
        assert (await site.agent.settings())[1]["replicate"] is False
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "failed_over"
    assert (item["failover"]["point"], item["failover"]["shutdown"]["result"]) == (
        p2.id, "no answer")
    await _refused(api, "test-failover")
    await _refused(api, "failover")

    job = await _run(api, "change-recovery-point", {"at": p1.created})  # the newest then
    assert job["state"] == "succeeded", job
    assert p1.id in step(job, "select_point")["message"]
    _recovered_is(site, p1, drill=False)
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "failed_over" and item["failover"]["point"] == p1.id
    assert item["failover"]["history"] == [{"point": p2.id, "job": item["failover"][
        "history"][0]["job"]}]

    job = await _run(api, "commit")
    assert job["state"] == "succeeded", job
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "committed" and item["failover"]["committed"] is not None
    assert await site.vault.list_points("web01") == []
    assert (await api.get("/api/v1/points", machine="web01"))["points"] == []
    assert (site.recovered / "web01" / "vm.json").exists()  # the failed-over machine stays
    for verb in ("commit", "failover", "test-failover", "change-recovery-point"):
        assert "committed" in await _refused(api, verb)


async def test_cli_drill_with_wait(site: Site, cs: ConfigServer) -> None:
    args = ["--api", cs.url, "--token-file", str(cs.cfg.token_path)]
    r = await asyncio.to_thread(run_cli, "failover", "test", "web01", "--point",
                                "latest-crash-consistent", "--wait", "--json", *args)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["kind"] == "test_failover" and job["state"] == "succeeded"
    assert "Restore the disks from the vault: succeeded" in r.stderr
    r = await asyncio.to_thread(run_cli, "failover", "start", "web01", *args)
    assert r.returncode == 2 and "test_failover_done" in r.stderr
    assert "siterecovery failover cleanup web01" in r.stderr
    r = await asyncio.to_thread(run_cli, "failover", "cleanup", "web01", "--notes", "ok",
                                "--wait", *args)
    assert r.returncode == 0, r.stderr
    assert "Cleanup test failover web01: succeeded" in r.stdout

    # failed over, then back to the older point on another network for this run only
    assert (await _run(site.api, "failover"))["state"] == "succeeded"
    p1 = site.points[0]
    r = await asyncio.to_thread(run_cli, "failover", "change-point", "web01", "--at",
                                p1.created, "--network", "dr-net-2", "--wait", "--json",
                                *args)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert (job["kind"], job["state"]) == ("change_recovery_point", "succeeded")
    vm = json.loads((site.recovered / "web01" / "vm.json").read_text())
    assert (vm["point"], vm["network"]) == (p1.id, "dr-net-2")

    r = await asyncio.to_thread(run_cli, "failover", "commit", "web01", "--wait", "--json",
                                *args)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert (job["kind"], job["state"]) == ("commit_failover", "succeeded")
    assert "Delete the recovery points from the vault: succeeded" in r.stderr
    item = await site.api.get("/api/v1/items/web01")
    assert (item["state"], item["failover"]["point"]) == ("committed", p1.id)
    assert await site.vault.list_points("web01") == []


def test_the_boot_proof_timeout_is_a_setting() -> None:
    assert ConfigServerConfig(data_dir="/d").failover_boot_timeout_seconds == 600.0
    ConfigServerConfig(data_dir="/d", failover_boot_timeout_seconds=30.0).validate()
    for bad in (0.0, -5.0, 86401.0):
        with pytest.raises(ValueError, match=r"failover_boot_timeout_seconds must be more "
                                             r"than 0 and at most 86400"):
            ConfigServerConfig(data_dir="/d", failover_boot_timeout_seconds=bad).validate()


async def test_folder_target_formats_and_idempotent_cleanup(tmp_path: Path) -> None:
    raw = tmp_path / "sda.raw"
    data = disk_data(7)
    raw.write_bytes(data)
    disks = [RecoveryDisk("sda", raw, len(data))]
    spec = RecoverySpec(machine="m", vm_name="m-dr", point="p")
    for fmt in ("vhd", "qcow2"):
        target = FolderTarget(tmp_path / fmt, fmt)
        assert await target.check(spec, disks) == []
        made = await target.create(spec, disks)
        assert made == target.planned(spec, disks)  # named before it ran
        image = tmp_path / fmt / "m-dr" / f"sda.{fmt}"
        out = tmp_path / f"back-{fmt}.raw"
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-f", "vpc" if fmt == "vhd" else fmt, "-O", "raw",
            str(image), str(out))
        assert await proc.wait() == 0
        back = out.read_bytes()
        assert back[:len(data)] == data and not any(back[len(data):])
        assert await target.boot(made, 1.0) is None
        await target.cleanup(made)
        await target.cleanup(made)  # again: nothing left is not an error
        assert list((tmp_path / fmt).iterdir()) == []
    refusals = await FolderTarget(tmp_path / "x").check(
        RecoverySpec(machine="m", vm_name=".."), [])
    assert sorted(r.setting for r in refusals) == ["disks", "vm_name"]
