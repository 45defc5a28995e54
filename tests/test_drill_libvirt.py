"""A drill on libvirt end to end: a real bootable Linux disk protected through the real
path (Mobility agent → process server → vault, points reported to the configuration
server's catalog), changed between cycles through its filesystem, test-failed-over on a
real libvirtd through the configuration server's API, then cleaned up (after a drill
the host refuses by setting before it restores anything). One VM boot.
Then the source loses its boot loader's sector (carried by the agent's next cycle): a
drill of that point checks clean but fails at the boot step with the console's last
lines, and its cleanup too leaves nothing.

And: a configuration server that starts frees the loop devices a killed check left
attached over its failover work folder."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests import libvirtfixtures
from tests.bootdisk import HOSTNAME, MARKER, PART_START, bootdisk
from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    make_pki,
    make_vault,
    open_vault,
    proc_config,
    running_procserver,
)
from tests.libvirtfixtures import need_root_tools
from tests.sitehelpers import AgentSite, add_machine, next_job, step, wait_job
from vault.regkey import make_key

pytestmark = pytest.mark.root
uri, images = libvirtfixtures.uri, libvirtfixtures.images  # the shared fixtures
VM = "sr-drill-web01"
DRILL_NET = "siterecovery-drill"  # the libvirt target's isolated drill network
DRILL_SUBNET = "10.215.0.0/24"  # not test_target_libvirt's, should both ever exist
DRILL_BOUND = 900.0  # seconds for the whole drill job under emulation: a bound, not a measure


@pytest.fixture
async def catalog_url(tmp_path: Path) -> str:
    """SQLite only: one VM boot for the module (the catalog is tested on both elsewhere)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"


@pytest.fixture
async def cs(tmp_path: Path, catalog_url: str, uri: str, images: Path
             ) -> AsyncIterator[ConfigServer]:
    server = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0, database_url=catalog_url,
        libvirt_uri=uri, libvirt_image_dir=str(images), libvirt_drill_subnet=DRILL_SUBNET))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def procserver(tmp_path: Path, pki: Pki, cs: ConfigServer, api: ApiClient
                     ) -> AsyncIterator[ProcServer]:
    """A real process server on the vault the configuration server is registered with,
    reporting its points to that server's catalog."""
    url, key = await make_vault(tmp_path)
    vault = await open_vault(tmp_path / "vault", key)
    try:
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
    finally:
        await vault.close()
    cfg = proc_config(tmp_path, pki, url, key, configserver_url=cs.url,
                      configserver_token_file=str(cs.cfg.internal_token_path), name="ps1",
                      heartbeat_interval_seconds=3600, segment_bytes=1 << 20,
                      cache_quota_bytes=256 << 20)
    async with running_procserver(cfg) as ps:
        async with asyncio.timeout(60), cs.changed:  # registered by its first heartbeat
            while "ps1" not in {p["name"] for p in (await api.get("/api/v1/procservers"))[
                    "procservers"]}:
                await cs.changed.wait()
        yield ps


def _run(*argv: str | Path) -> str:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res.stdout


def _virsh(uri: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", uri, *argv], capture_output=True, text=True)


def _write_drill_token(image: Path, token: str, mnt: Path) -> None:
    """Change the disk the way its machine would: through its mounted filesystem."""
    mnt.mkdir(exist_ok=True)
    _run("mount", "-o", f"loop,offset={PART_START * 512}", image, mnt)
    try:
        (mnt / "etc" / "siterecovery-drill").write_text(token + "\n")
    finally:
        _run("umount", mnt)  # the loop device goes with it (autoclear)


async def _catalog(api: ApiClient) -> set[str]:
    return {p["id"] for p in (await api.get("/api/v1/points", machine="web01"))["points"]}


async def _in_catalog(cs: ConfigServer, api: ApiClient, point: str) -> None:
    async with asyncio.timeout(60), cs.changed:
        while point not in await _catalog(api):
            await cs.changed.wait()


def _detach(dev: str) -> None:
    subprocess.run(["losetup", "--detach", dev], capture_output=True)


def _loops_under(root: Path) -> list[str]:
    out = json.loads(_run("losetup", "--list", "--json", "-O", "NAME,BACK-FILE") or "{}")
    return [d["name"] for d in out.get("loopdevices", [])
            if str(d.get("back-file") or "").startswith(str(root))]


async def test_drill_of_a_protected_boot_disk_on_libvirt_then_cleanup(
        cs: ConfigServer, api: ApiClient, procserver: ProcServer, pki: Pki, uri: str,
        images: Path, tmp_path: Path) -> None:
    # web01 in the inventory, assigned to the process server, replication enabled
    await add_machine(api, "web01", disks=("sda",))
    await api.patch("/api/v1/machines/web01", {"process_server": "ps1"})
    enable = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]
    site = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01", cs.passphrase,
                                  tmp_path / "agent-site")
    async with site:
        assert (await site.heartbeat("2.0.0"))[0] == 200
        assert (await site.progress({"sda": 100}))[0] == 200

    # its disk: the boot disk, changed through its filesystem before each cycle
    disk = tmp_path / "web01-sda.img"
    shutil.copyfile(bootdisk(), disk)
    tokens = [f"drill-{i}-{uuid.uuid4().hex[:12]}" for i in range(2)]
    agent = make_agent(agent_config(tmp_path, pki, "web01", procserver.port, {"sda": disk}))
    points = []
    try:
        for token in tokens:
            _write_drill_token(disk, token, tmp_path / "mnt")
            r = await agent.replicate_once()
            points.append(await procserver.wait_point(r.cycle, timeout=120))
            await _in_catalog(cs, api, points[-1])
        await _protected_and_drilled(cs, api, enable, points, tokens, uri, images, tmp_path)

        # the source loses its boot loader's sector (the first of its partition; the
        # filesystem stays whole): the next cycle carries it into a point
        with open(disk, "r+b") as f:
            f.seek(PART_START * 512)
            f.write(bytes(512))
        r = await agent.replicate_once()
        bad = await procserver.wait_point(r.cycle, timeout=120)
        await _in_catalog(cs, api, bad)
    finally:
        agent.close()
    await _unbootable_drill(api, bad, uri)
    _assert_nothing_left(cs, uri, images, tmp_path)


async def _protected_and_drilled(cs: ConfigServer, api: ApiClient, enable: dict[str, Any],
                                 points: list[str], tokens: list[str], uri: str,
                                 images: Path, tmp_path: Path) -> None:
    """Protection ends, a drill of the newest point boots with its files, and its
    cleanup leaves nothing."""
    assert (await wait_job(api, enable["id"]))["state"] == "succeeded"
    fin = await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
    assert fin["state"] == "succeeded", fin
    assert (await api.get("/api/v1/items/web01"))["state"] == "protected"

    # settings this host cannot take are refused before anything is restored, each
    # naming the setting and what is allowed here; the item is protected again
    await api.call("PATCH", "/api/v1/items/web01/recovery", {
        "target": "libvirt", "vm_name": VM, "memory_mib": 4194304}, {})  # 4 TiB
    refused = await wait_job(api, (await api.post("/api/v1/items/web01/test-failover",
                                                  {}))["job"]["id"])
    assert refused["state"] == "failed" and step(refused, "select_point")["state"] == "failed"
    assert re.search(r"the target refuses the recovery: memory_mib: 4194304: 64 to \d+ MiB "
                     "on this host$", refused["error"]), refused["error"]
    assert step(refused, "restore")["state"] == "skipped"  # nothing restored
    assert (await api.get("/api/v1/items/web01"))["state"] == "protected"

    # the drill: libvirt, a small machine, proof of boot is the disk's console line
    await api.call("PATCH", "/api/v1/items/web01/recovery", {
        "memory_mib": 256, "boot_marker": MARKER}, {})
    jid = (await api.post("/api/v1/items/web01/test-failover", {}))["job"]["id"]
    job = await wait_job(api, jid, timeout=DRILL_BOUND)
    try:
        _drill_succeeded(job, await api.get("/api/v1/items/web01"), points, tokens, uri,
                         images)
    finally:  # whatever was asserted, the machine goes (the job's own cleanup first)
        notes = "web01 booted with the token of the last cycle; console checked"
        done = await wait_job(api, (await api.post(
            "/api/v1/items/web01/cleanup-test-failover", {"notes": notes}))["job"]["id"],
            timeout=120)
    assert done["state"] == "succeeded", done
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "protected"
    assert (item["last_drill"]["notes"], item["last_drill"]["cleanup_job"]) == (
        notes, done["id"])
    assert VM in step(done, "cleanup")["message"]
    _assert_nothing_left(cs, uri, images, tmp_path)


async def _unbootable_drill(api: ApiClient, bad: str, uri: str) -> None:
    """A drill of a point whose disk does not boot: its checks pass (its filesystem is
    whole), the boot step fails with the console's last lines, the item keeps them."""
    jid = (await api.post("/api/v1/items/web01/test-failover", {}))["job"]["id"]
    job = await wait_job(api, jid, timeout=DRILL_BOUND)
    try:
        assert job["state"] == "failed", job
        assert bad in step(job, "select_point")["message"]
        assert [step(job, s)["state"] for s in ("verify", "create", "boot")] == [
            "succeeded", "succeeded", "failed"], job["steps"]
        # (the line may be read before its last character: 'No bootable device' is enough)
        assert "cannot boot: its console shows 'No bootable device" in job["error"]
        tail = job["error"].split("the console's last lines: ", 1)[1].split(" | ")
        assert "Booting from Hard Disk..." in tail and "Missing operating system." in tail
        item = await api.get("/api/v1/items/web01")
        drill = item["last_drill"]
        assert item["state"] == "test_failover_done"  # its machine is there to clean up
        assert (drill["job"], drill["point"], drill["result"]) == (jid, bad, "failed")
        assert drill["boot"]["booted"] is False
        assert any("No bootable device" in ln for ln in drill["boot"]["console_tail"])
        assert not any(MARKER in ln for ln in drill["boot"]["console_tail"])
        assert drill["last_success"]["point"] != bad  # the good drill is still the last
        assert _virsh(uri, "domstate", VM).stdout.strip() == "shut off"  # stopped, defined
    finally:
        done = await wait_job(api, (await api.post(
            "/api/v1/items/web01/cleanup-test-failover",
            {"notes": "the boot loader is gone from this point"}))["job"]["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert (await api.get("/api/v1/items/web01"))["state"] == "protected"


def _assert_nothing_left(cs: ConfigServer, uri: str, images: Path, tmp_path: Path) -> None:
    """No domain, no drill network, no image, no work, no loop device."""
    assert _virsh(uri, "domuuid", VM).returncode != 0, "the domain is still defined"
    assert DRILL_NET not in _virsh(uri, "net-list", "--all", "--name").stdout.split()
    assert list(images.iterdir()) == []
    assert list((Path(cs.cfg.data_dir) / "failover-work").iterdir()) == []
    assert _loops_under(tmp_path) == []


def _drill_succeeded(job: dict[str, Any], item: dict[str, Any], points: list[str],
                     tokens: list[str], uri: str, images: Path) -> None:
    assert job["state"] == "succeeded", job
    proof = f"{MARKER} hostname={HOSTNAME} drill={tokens[-1]}"  # the last cycle's file
    assert points[-1] in step(job, "select_point")["message"]
    assert "sda: ext4 clean" in step(job, "verify")["message"]
    assert proof in step(job, "boot")["message"]
    assert "RTO" in step(job, "boot")["message"] and "RTO" in step(job, "record")["message"]
    drill = item["last_drill"]
    assert item["state"] == "test_failover_done"
    assert (drill["job"], drill["point"], drill["result"], drill["target"]) == (
        job["id"], points[-1], "succeeded", "libvirt")
    check = drill["checks"]["sda"]
    assert check["ok"] is True and check["table"] == "mbr", check
    assert [(c["fs"], c["status"]) for c in check["checks"]] == [("ext4", "clean")]
    boot = drill["boot"]
    assert (boot["booted"], boot["matched"]) == (True, proof)
    assert boot["seconds"] > 0 and any(proof in ln for ln in boot["console_tail"])
    assert not any(tokens[0] in ln for ln in boot["console_tail"])
    # the RTO runs from the job's start to the proof of boot: past the boot itself
    assert isinstance(drill["rto_seconds"], float) and drill["rto_seconds"] >= boot["seconds"]
    assert f"domain:{VM}" in drill["recovered"]["resources"]
    assert any(r.startswith(f"network:{DRILL_NET}") for r in drill["recovered"]["resources"])
    assert _virsh(uri, "domuuid", VM).returncode == 0
    assert (images / VM).is_dir()
    assert drill["work"] is None  # the restored images went once the target had its copy


async def test_a_starting_server_frees_loop_devices_left_over_its_work_folder(
        tmp_path: Path, catalog_url: str) -> None:
    """A check killed with its loop device attached (kill -9 of the server) leaves it;
    the next start detaches it — and only what lies under its work folder."""
    need_root_tools()
    data = tmp_path / "cs"
    stale, other = data / "failover-work" / "job1" / "sda.img", tmp_path / "other.img"
    stale.parent.mkdir(parents=True)
    for f in (stale, other):
        with open(f, "wb") as fh:
            fh.truncate(1 << 20)
    devs = [_run("losetup", "--find", "--show", "--read-only", f).strip()
            for f in (stale, other)]
    try:
        assert _loops_under(data) == [devs[0]]
        server = ConfigServer(ConfigServerConfig(data_dir=str(data), listen_port=0,
                                                 site_port=-1, database_url=catalog_url))
        await server.start()
        await server.stop()
        assert _loops_under(data) == []
        assert _loops_under(other) == [devs[1]]  # not the server's: left alone
    finally:
        for dev in devs:
            _detach(dev)
