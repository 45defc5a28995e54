"""Failover through the real configuration server (SQLite and PostgreSQL), a real vault
with real points and the folder target: a drill and its cleanup, failover, change of
recovery point, commit, verbs refused in the wrong state, and a ``configserver run``
killed with kill -9 in the middle of a failover that resumes it — once while its restore
waits, once inside the target's create (a ``cp`` stopped part way)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from targets.base import RecoveryDisk, RecoverySpec
from targets.folder import FolderTarget
from tests.backends import missing_backend
from tests.helpers import (
    Daemon,
    make_vault,
    open_vault,
    run_cli,
    sha256,
    write_full_point,
    write_toml,
)
from tests.sitehelpers import (
    AgentSite,
    add_machine,
    add_procserver,
    next_job,
    report_point,
    step,
    wait_job,
)
from vault.locks import Lock, try_acquire
from vault.point import Point
from vault.regkey import make_key
from vault.repo import Vault

DISK = (8 << 20) + 5120  # a short last block (disks are whole 512-byte sectors)


def _data(seed: int) -> bytes:
    return os.urandom(DISK // 2) + bytes(DISK - DISK // 2 - 100) + bytes([seed]) * 100


def _ext4(tmp: Path, seed: int, *, damaged: bool = False) -> bytes:
    """A whole-disk ext4 with a few files (mkfs.ext4 -d); ``damaged``: its inode table
    overwritten, which e2fsck -fn reports."""
    for tool in ("mkfs.ext4", "e2fsck", "dumpe2fs", "losetup"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs e2fsprogs and util-linux")
    if os.geteuid() != 0:
        missing_backend("root (read-only loop devices for e2fsck)", "run the suite as root")
    content, img = tmp / f"content{seed}", tmp / f"disk{seed}.img"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text(f"web01-{seed}\n")
    with open(img, "wb") as f:
        f.truncate(DISK)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(img)],
                   check=True)
    if damaged:
        dump = subprocess.run(["dumpe2fs", str(img)], capture_output=True, text=True,
                              check=True).stdout
        m = re.search(r"Inode table at (\d+)-", dump)
        assert m is not None
        with open(img, "r+b") as f:
            f.seek(int(m.group(1)) * 4096)
            f.write(b"\xa5" * 8 * 4096)
    return img.read_bytes()


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


async def _register(api: ApiClient, tmp: Path) -> Vault:
    url, key = await make_vault(tmp)
    vault = await open_vault(tmp / "vault", key)
    await api.post("/api/v1/registration", {
        "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
    return vault


async def _protect(api: ApiClient, url: str, site_url: str, internal: str, ca: Path,
                   passphrase: str, tmp: Path, vault: Vault) -> tuple[list[Point],
                                                                       dict[str, bytes]]:
    """web01 protected through the real jobs, with two full points of one disk (sda)."""
    await add_procserver(url, internal)
    await add_machine(api, "web01", disks=("sda",))
    agent = await AgentSite.enroll(site_url, ca, "web01", passphrase, tmp / "agent")
    jid = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]["id"]
    async with agent:
        assert (await agent.heartbeat("2.0.0"))[0] == 200
        assert (await agent.progress({"sda": 100}))[0] == 200
    points, data = [], {}
    for i in range(2):
        d = _ext4(tmp, i)
        p = await write_full_point(vault, d, machine="web01", cycle=f"c{i}")
        await report_point(url, internal, "web01", p.id, p.created, p.consistency)
        points.append(p)
        data[p.id] = d
    assert (await wait_job(api, jid))["state"] == "succeeded"
    fin = await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
    assert fin["state"] == "succeeded"
    assert (await api.get("/api/v1/items/web01"))["state"] == "protected"
    return points, data


@pytest.fixture
async def site(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> AsyncIterator[Site]:
    vault = await _register(api, tmp_path)
    try:
        points, data = await _protect(api, cs.url, cs.site_url, cs.internal_token,
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


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


async def test_a_drill_of_a_damaged_point_fails_with_the_fsck_findings(
        site: Site, cs: ConfigServer, tmp_path: Path) -> None:
    api = site.api
    bad = await write_full_point(site.vault, _ext4(tmp_path / "bad", 9, damaged=True),
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
    for name, value in _cp_shim(tmp_path / "cp-shim").items():
        monkeypatch.setenv(name, value)
    folder = site.recovered / "web01"
    pid = None
    try:
        async with _cp_stops(tmp_path / "cp-shim") as told:
            jid = (await api.post("/api/v1/items/web01/test-failover", {}))["job"]["id"]
            pid = await asyncio.wait_for(told, 120)
        assert (folder.with_name("web01.partial") / "sda.img").stat().st_size == 65536
        assert (await api.post(f"/api/v1/jobs/{jid}/cancel", {}))["state"] == "cancelled"
    finally:
        if pid is not None:
            _kill(pid)
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


async def test_folder_target_formats_and_idempotent_cleanup(tmp_path: Path) -> None:
    raw = tmp_path / "sda.raw"
    data = _data(7)
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


async def test_kill9_during_a_failover_resumes_it(tmp_path: Path, catalog_url: str) -> None:
    data_dir = tmp_path / "cs"
    config = write_toml(tmp_path / "configserver.toml", {
        "data_dir": str(data_dir), "listen_port": 0, "site_port": 0,
        "database_url": catalog_url})
    args = ["configserver", "run", "--config", str(config)]
    first, second = Daemon(args, "configserver_started"), None
    started: list[Daemon] = []  # the servers of the kill inside create
    stopped: list[int] = []  # its stopped cp
    ready = await first.start()
    url, site_url = f"http://127.0.0.1:{ready['port']}", f"https://127.0.0.1:{ready['site_port']}"
    token = (data_dir / "api-token").read_text().strip()
    internal = (data_dir / "internal-token").read_text().strip()
    held: Lock | None = None
    vault: Vault | None = None
    try:
        async with ApiClient(url, token) as api:
            vault = await _register(api, tmp_path)
            points, data = await _protect(
                api, url, site_url, internal, data_dir / "ca" / "ca.pem",
                (data_dir / "enrollment-passphrase").read_text().strip(), tmp_path, vault)
            got = await try_acquire(vault, "exclusive", "test: a prune")  # the restore waits
            assert isinstance(got, Lock)
            held = got
            jid = (await api.post("/api/v1/items/web01/failover", {}))["job"]["id"]
            await first.wait_events("vault_locked_waiting", 1)
            before = await api.get(f"/api/v1/jobs/{jid}")
            assert step(before, "restore")["state"] == "running"
        await first.kill9()
        assert first.events("job_succeeded") == [] or all(
            e["job"] != jid for e in first.events("job_succeeded"))

        # the restarted server runs cp through a shim that can stop it part way (below)
        second = Daemon(args, "configserver_started", _cp_shim(tmp_path / "cp-shim"))
        ready = await second.start()
        url = f"http://127.0.0.1:{ready['port']}"
        (resumed,) = await second.wait_events("job_resumed", 1)
        assert (resumed["job"], resumed["attempts"]) == (jid, 2)
        async with ApiClient(url, token) as api:
            assert (await api.get("/api/v1/items/web01"))["state"] == "failover_in_progress"
            await held.release()
            held = None
            done = await wait_job(api, jid, timeout=120)
            assert done["state"] == "succeeded" and done["attempts"] == 2, done
            for name in ("prerequisites", "shutdown_source", "stop_replication",
                         "select_point"):
                assert step(done, name) == step(before, name)  # done before the kill
                assert step(done, name)["attempts"] == 1
            assert step(done, "restore")["attempts"] == 2
            item = await api.get("/api/v1/items/web01")
            assert item["state"] == "failed_over" and item["failover"]["point"] == points[1].id
        image = data_dir / "recovered" / "web01" / "sda.img"
        assert sha256(image) == sha256_of(data[points[1].id])

        # killed again, inside the target's create: a change of point copying its image
        await _kill9_inside_create(second, args, token, tmp_path, started, stopped)
        assert sha256(image) == sha256_of(data[points[0].id])
        assert not (data_dir / "recovered" / "web01.partial").exists()
        assert sorted(p.name for p in (data_dir / "recovered").iterdir()) == ["web01"]
    finally:
        if held is not None:
            await held.release()
        if vault is not None:
            await vault.close()
        for d in (first, second, *started):
            if d is not None and d.proc is not None and d.proc.returncode is None:
                await d.stop()
        for pid in stopped:
            _kill(pid)


CP_SHIM = """#!{python}
# cp as the folder target runs it (cp OPTIONS SRC DST); when the test asks, it writes
# part of the image, tells the test its pid and stops there
import os, signal, socket, sys
ask = os.path.join(os.environ["SR_TEST_CP"], "stop")
if os.path.exists(ask):
    os.unlink(ask)
    with open(sys.argv[-2], "rb") as src, open(sys.argv[-1], "wb") as dst:
        dst.write(src.read(65536))
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(os.environ["SR_TEST_CP"], "notify"))
        s.sendall(str(os.getpid()).encode())
    os.kill(os.getpid(), signal.SIGSTOP)
os.execv({cp!r}, ["cp", *sys.argv[1:]])
"""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def _cp_shim(shim: Path) -> dict[str, str]:
    """The environment of a server whose ``cp`` is ``CP_SHIM`` in ``shim``."""
    shim.mkdir()
    (shim / "cp").write_text(CP_SHIM.format(python=sys.executable, cp=shutil.which("cp")))
    (shim / "cp").chmod(0o755)
    return {"PATH": f"{shim}:{os.environ['PATH']}", "SR_TEST_CP": str(shim)}


@asynccontextmanager
async def _cp_stops(shim: Path) -> AsyncIterator[asyncio.Future[int]]:
    """Ask the next ``cp`` run through the shim in ``shim`` to stop part way; the future
    gets its pid once it stopped."""
    told: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def tell(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        told.set_result(int(await reader.read()))
        writer.close()
        await writer.wait_closed()

    async with await asyncio.start_unix_server(tell, path=str(shim / "notify")):
        (shim / "stop").touch()
        yield told


async def _kill9_inside_create(stopping: Daemon, args: list[str], token: str,
                               tmp_path: Path, started: list[Daemon], stopped: list[int]
                               ) -> None:
    """Change web01's point back to the first one with ``cp`` stopped in the middle of
    the folder target's copy, kill -9 the server (``stopping``, running with the shim)
    there, start it again: the job resumes at its create step, which makes the machine
    whole. The server it starts goes on ``started``, the stopped cp's pid on
    ``stopped``: the caller ends them."""
    shim = tmp_path / "cp-shim"
    ready = stopping.ready
    async with _cp_stops(shim) as told, \
            ApiClient(f"http://127.0.0.1:{ready['port']}", token) as api:
        points = (await api.get("/api/v1/points", machine="web01"))["points"]
        first = min(points, key=lambda p: str(p["created"]))["id"]
        jid = (await api.post("/api/v1/items/web01/change-recovery-point",
                              {"point": first}))["job"]["id"]
        stopped.append(await asyncio.wait_for(told, 120))
        before = await api.get(f"/api/v1/jobs/{jid}")
        assert step(before, "create")["state"] == "running", before
        item = await api.get("/api/v1/items/web01")  # named before create began
        folder = tmp_path / "cs" / "recovered" / "web01"
        assert item["failover"]["planned"]["resources"] == [f"folder:{folder}"]
        assert item["failover"]["recovered"] is None  # the other point's machine went
        half = folder.with_name("web01.partial") / "sda.img"
        assert half.stat().st_size == 65536  # the copy stopped part way
    await stopping.kill9()
    again = Daemon(args, "configserver_started")
    started.append(again)
    ready = await again.start()
    (resumed,) = await again.wait_events("job_resumed", 1)
    assert (resumed["job"], resumed["attempts"]) == (jid, 2)
    async with ApiClient(f"http://127.0.0.1:{ready['port']}", token) as api:
        done = await wait_job(api, jid, timeout=120)
        assert done["state"] == "succeeded" and done["attempts"] == 2, done
        for name in ("prerequisites", "select_point", "restore", "verify"):
            assert step(done, name)["attempts"] == 1, name  # done before the kill
        assert step(done, "create")["attempts"] == 2
        item = await api.get("/api/v1/items/web01")
        assert item["state"] == "failed_over" and item["failover"]["point"] == first
        assert item["failover"]["planned"] is None
