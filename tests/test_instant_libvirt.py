"""Instant recovery on libvirt end to end (one VM boot per test): the bootable test disk,
as a point in a real vault, drilled with ``--instant`` through a real ``configserver
run`` on a real libvirtd. The machine boots on NBD disks served from the vault with less than
a fifth of the point's data local; the guest writes (a block that was a hole, a block
not fetched yet); part way through the hydration the configuration server (the NBD
servers' process) is killed with kill -9: the guest's reads fail, and never return
other data; restarted, the server resumes the job, serves the disk again from its
overlay and hydration goes on; the running machine moves onto the local image without
a reboot, and that image holds the point plus the guest's writes, byte for byte; the
cleanup leaves nothing. Then a failover (``failover start --instant``) of the same disk
whose configuration server is killed during the block copy onto the local image: the
restarted server finds QEMU's copy job, waits for it and pivots; the failover is
committed.

The guest is the test boot disk with an init of its own (an extra initramfs archive
appended to its initrd replaces ``/init``): after the boot line it writes two sectors,
then reads a sector back every second ("alive" lines) for as long as it runs.

Without a VM: ``--instant`` on a target that cannot do it is refused naming the target,
and the domain XML of NBD disks and its rewrite onto local images."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from configserver import failover
from configserver.config import ConfigServerConfig
from configserver.failover import FailoverDeps
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from targets.base import RecoverySpec
from targets.domainxml import (
    DomainLayout,
    NbdSource,
    domain_xml,
    with_local_disks,
)
from tests import libvirtfixtures
from tests.backends import missing_backend
from tests.bootdisk import (
    HOSTNAME,
    MARKER,
    PART_START,
    Cpio,  # the initramfs format the boot disk is built with
    bootdisk,
)
from tests.helpers import Daemon, make_vault, open_vault, write_full_point, write_toml
from tests.libvirtd import isolated_network
from tests.libvirtfixtures import need_root_tools
from tests.sitehelpers import (
    AgentSite,
    add_machine,
    add_procserver,
    next_job,
    report_point,
    step,
    wait_job,
)
from vault.regkey import make_key

uri, images = libvirtfixtures.uri, libvirtfixtures.images  # the shared fixtures
VM = "sr-instant-web01"
FAILOVER_VM = "sr-instant-fo01"
DRILL_SUBNET = "10.216.0.0/24"  # not another libvirt test's
FAILOVER_NET, FAILOVER_BRIDGE = "sr-instant-prod", "virbr-srinprod"  # the failover's network
FAILOVER_SUBNET = "10.218.0.0/24"
DRILL_BOUND = 900.0  # seconds for the whole drill under emulation: a bound, not a measure
RATE_MBPS = 80.0  # hydration's rate: ~12 s for the point's data, killed part way
FILLER_MIB = 96  # data after the boot disk that the guest never reads
SECTOR = 512
HOLE_SECTOR = 1024  # before the partition: zeros in the point (a hole)
DATA_SECTOR = (64 << 20) // SECTOR + 3 * 2048 + 7  # in the filler: stored, not read at boot
GUEST_BLOCK = (b"siterecovery-instant-guest-write " * 16)[:SECTOR]

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.load); do insmod "/modules/$m.ko"; done
echo "siterecovery-init: waiting for /dev/vda1"
i=0
while [ ! -b /dev/vda1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if mount -t ext4 -o ro /dev/vda1 /root; then
  h=$(cat /root/etc/hostname 2>/dev/null)
  d=$(head -n 1 /root/etc/siterecovery-drill 2>/dev/null)
  umount /root
  dd if=/guest-write.bin of=/dev/vda bs=512 seek={HOLE_SECTOR} conv=notrunc,fsync 2>/dev/null
  dd if=/guest-write.bin of=/dev/vda bs=512 seek={DATA_SECTOR} conv=notrunc,fsync 2>/dev/null
  echo "siterecovery-boot-ok hostname=$h drill=$d"
else
  echo "siterecovery-boot-failed: cannot mount /dev/vda1"
fi
n=0
while true; do
  sleep 1
  n=$((n + 1))
  echo 3 > /proc/sys/vm/drop_caches
  s=$(dd if=/dev/vda bs=512 skip={HOLE_SECTOR} count=1 2>/dev/null | md5sum | cut -c1-12)
  echo "siterecovery-alive $n $s"
done
"""
ALIVE = re.compile(r"siterecovery-alive (\d+) ([0-9a-f]+)")
GOOD = hashlib.md5(GUEST_BLOCK).hexdigest()[:12]  # the sector the guest wrote, read back
FAILED = hashlib.md5(b"").hexdigest()[:12]  # a read that failed: nothing to digest


def _need_root_tools() -> None:
    need_root_tools()
    if shutil.which("nbdfuse") is None:
        missing_backend("nbdfuse", "tests/run.sh installs libnbd-bin")
    if not Path("/dev/fuse").exists():
        missing_backend("/dev/fuse", "the disk checks read an NBD disk through FUSE")


def _run(*argv: str | Path) -> str:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res.stdout


def _virsh(uri: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", uri, *argv], capture_output=True, text=True)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The boot disk with the instant init, and ``FILLER_MIB`` of random data after it."""
    _need_root_tools()
    tmp = tmp_path_factory.mktemp("instant-disk")
    img, mnt = tmp / "disk.img", tmp / "mnt"
    shutil.copyfile(bootdisk(), img)
    mnt.mkdir()
    _run("mount", "-o", f"loop,offset={PART_START * SECTOR}", img, mnt)
    try:
        extra = Cpio()  # a second archive: the kernel unpacks it over the first
        extra.add("init", 0o100755, INIT.encode())
        extra.add("guest-write.bin", 0o100644, GUEST_BLOCK)
        with open(mnt / "boot" / "initrd.gz", "ab") as f:
            f.write(gzip.compress(extra.finish(), mtime=0))
    finally:
        _run("umount", mnt)
    data = img.read_bytes() + os.urandom(FILLER_MIB << 20)
    img.unlink()
    return data


@pytest.fixture(scope="module")
def no_leftover_domains(uri: str) -> None:
    """No domain of this module's names left defined by a run killed before its clean-up
    (the next run's drill or failover would fail: "a domain of that name already
    exists")."""
    for name in (VM, FAILOVER_VM):
        if _virsh(uri, "domuuid", name).returncode == 0:
            _virsh(uri, "destroy", name)
            gone = _virsh(uri, "undefine", name)
            assert gone.returncode == 0, gone.stderr


@pytest.fixture(scope="module")
def failover_net(uri: str) -> Iterator[str]:
    """A stand-in for the production network a failover joins (isolated: the guest sends
    nothing), made and removed by the test."""
    with isolated_network(uri, FAILOVER_NET, FAILOVER_BRIDGE, FAILOVER_SUBNET) as name:
        yield name


@pytest.fixture
async def cs(tmp_path: Path) -> AsyncIterator[ConfigServer]:
    """A configuration server without libvirt: its items' target is the folder one."""
    server = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def api(cs: ConfigServer) -> AsyncIterator[ApiClient]:
    async with ApiClient(cs.url, cs.admin_token) as client:
        yield client


async def _protect(api: ApiClient, data_dir: Path, ready: dict[str, Any], tmp: Path,
                   data: bytes) -> str:
    """web01 protected, with one full point of ``data`` as its disk sda; the point."""
    url, key = await make_vault(tmp)
    vault = await open_vault(tmp / "vault", key)
    internal = (data_dir / "internal-token").read_text().strip()
    cs_url = f"http://127.0.0.1:{ready['port']}"
    try:
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
        await add_procserver(cs_url, internal)
        await add_machine(api, "web01", disks=("sda",))
        agent = await AgentSite.enroll(
            f"https://127.0.0.1:{ready['site_port']}", data_dir / "ca" / "ca.pem", "web01",
            (data_dir / "enrollment-passphrase").read_text().strip(), tmp / "agent")
        jid = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]["id"]
        async with agent:
            assert (await agent.heartbeat("2.0.0"))[0] == 200
            assert (await agent.progress({"sda": 100}))[0] == 200
        point = await write_full_point(vault, data, machine="web01")
        await report_point(cs_url, internal, "web01", point.id, point.created,
                           point.consistency)
    finally:
        await vault.close()
    assert (await wait_job(api, jid))["state"] == "succeeded"
    fin = await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
    assert fin["state"] == "succeeded", fin
    return point.id


def _console(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _alive(console: Path) -> list[tuple[int, str]]:
    """The guest's "alive" lines: (count, digest of the sector it read)."""
    return [(int(m[1]), m[2]) for m in ALIVE.finditer(_console(console))]


async def _alive_after(console: Path, n: int, bound: float = 120.0) -> tuple[int, str]:
    """The first "alive" line numbered ``n`` or more (the guest reads its disk each
    second), polling the console log until it appears or ``bound`` ends."""
    deadline = time.monotonic() + bound
    while not (later := [a for a in _alive(console) if a[0] >= n]):
        assert time.monotonic() < deadline, f"no alive line {n}: {_console(console)}"
        await asyncio.sleep(0.5)
    return later[0]


async def _console_shows(console: Path, text: str, bound: float = 120.0) -> None:
    """Poll the console log until ``text`` appears on it (or ``bound`` ends)."""
    deadline = time.monotonic() + bound
    while text not in _console(console):
        assert time.monotonic() < deadline, f"no {text!r} on the console: {_console(console)}"
        await asyncio.sleep(0.5)


def _assert_point_plus_guest_writes(image: Path, disk: bytes) -> None:
    want = bytearray(disk)
    for sector in (HOLE_SECTOR, DATA_SECTOR):
        want[sector * SECTOR:(sector + 1) * SECTOR] = GUEST_BLOCK
    got = image.read_bytes()
    assert len(got) == len(want)
    assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), \
        f"first difference at {next(i for i in range(len(got)) if got[i] != want[i])}"


def _qmp(uri: str, vm: str, command: str, **arguments: Any) -> Any:
    """A QMP command to ``vm``'s QEMU through libvirt; its return value."""
    cmd = {"execute": command, **({"arguments": arguments} if arguments else {})}
    res = _virsh(uri, "qemu-monitor-command", vm, json.dumps(cmd))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["return"]


def _copy_job(uri: str, vm: str) -> dict[str, Any] | None:
    """QEMU's block copy (mirror) job of ``vm``, if it runs one."""
    return next((j for j in _qmp(uri, vm, "query-block-jobs") if j["type"] == "mirror"),
                None)


async def _copy_job_paused(uri: str, vm: str, bound: float = 60.0) -> dict[str, Any]:
    """Poll QEMU until its copy job has paused (nothing in flight: a paused mirror job
    waits for its reads and writes first); the job then."""
    deadline = time.monotonic() + bound
    while True:
        job = _copy_job(uri, vm)
        assert job is not None, "the copy job ended"
        if job["status"] in ("paused", "standby"):  # standby: paused once ready
            return job
        assert time.monotonic() < deadline, f"the copy job did not pause: {job}"
        await asyncio.sleep(0.1)


def _daemon_args(tmp_path: Path, uri: str, images: Path, **settings: Any) -> list[str]:
    config = write_toml(tmp_path / "configserver.toml", {
        "data_dir": str(tmp_path / "cs"), "listen_port": 0, "site_port": 0,
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}",
        "libvirt_uri": uri, "libvirt_image_dir": str(images), **settings})
    return ["configserver", "run", "--config", str(config)]


@pytest.mark.usefixtures("no_leftover_domains")
async def test_instant_drill_boots_from_the_vault_survives_a_kill9_and_pivots(
        uri: str, images: Path, disk: bytes, tmp_path: Path) -> None:
    data_dir = tmp_path / "cs"
    args = _daemon_args(tmp_path, uri, images, libvirt_drill_subnet=DRILL_SUBNET)
    first, second = Daemon(args, "configserver_started"), None
    folder = images / VM
    console = folder / "console.log"
    try:
        ready = await first.start()
        token = (data_dir / "api-token").read_text().strip()
        async with ApiClient(f"http://127.0.0.1:{ready['port']}", token) as api:
            point = await _protect(api, data_dir, ready, tmp_path, disk)
            await api.call("PATCH", "/api/v1/items/web01/recovery", {
                "target": "libvirt", "vm_name": VM, "memory_mib": 256,
                "boot_marker": MARKER}, {})
            jid = (await api.post("/api/v1/items/web01/test-failover", {
                "instant": True, "hydrate_rate_mbps": RATE_MBPS}))["job"]["id"]
            # booted, and hydrating: a quarter done, the server is killed
            before = await wait_job(api, jid, lambda j: step(j, "hydrate")["progress"] >= 25,
                                    timeout=DRILL_BOUND)
            drill = (await api.get("/api/v1/items/web01"))["last_drill"]
        n_before = max((n for n, _d in _alive(console)), default=0)
        await first.kill9()

        # the guest's reads fail while nothing serves its disk; it never reads other data
        await _console_shows(console, "I/O error, dev vda")
        second = Daemon(args, "configserver_started")
        ready = await second.start()
        (resumed,) = await second.wait_events("job_resumed", 1)
        assert resumed["job"] == jid
        async with ApiClient(f"http://127.0.0.1:{ready['port']}", token) as api:
            job = await wait_job(api, jid, timeout=DRILL_BOUND)
            assert job["state"] == "succeeded" and job["attempts"] == 2, job
            assert [s["name"] for s in job["steps"]] == [
                "prerequisites", "select_point", "create", "verify", "boot", "hydrate",
                "record"]
            for name in ("create", "verify", "boot"):
                assert step(job, name) == step(before, name)  # done before the kill
            assert step(job, "hydrate")["attempts"] == 2
            # checked through the server, booted on it with less than a fifth local
            assert (drill["point"], drill["instant"]) == (point, True)
            assert "sda: ext4 clean" in step(job, "verify")["message"]
            proof = f"{MARKER} hostname={HOSTNAME} drill=bootdisk-v1"
            assert drill["boot"]["booted"] is True and drill["boot"]["matched"] == proof
            assert drill["local_at_boot_percent"] < 20, drill
            assert drill["rto_seconds"] >= drill["boot"]["seconds"]
            hydrate = step(job, "hydrate")["message"]
            assert f"{RATE_MBPS:g} Mbit/s" in hydrate and "without a reboot" in hydrate

            # on the local image now, in the running domain and in its definition
            raw = folder / "00-sda.raw"
            assert _virsh(uri, "domstate", VM).stdout.strip() == "running"
            assert str(raw) in _virsh(uri, "domblklist", VM).stdout
            inactive = _virsh(uri, "dumpxml", "--inactive", VM).stdout
            assert "protocol='nbd'" not in inactive and f"file='{raw}'" in inactive
            assert not list(folder.glob("*.sock")) and not list(folder.glob("*.overlay"))

            # no second boot; the guest goes on reading its disk, now the local image;
            # every read it made gave the block it wrote, or failed
            n, digest = await _alive_after(console, _alive(console)[-1][0] + 1)
            assert n > n_before and digest == GOOD
            assert {d for _n, d in _alive(console)} <= {GOOD, FAILED}, _console(console)
            text = _console(console)
            assert text.count("siterecovery-init: waiting") == 1, text
            assert text.count(MARKER) == 1, text

            # the image: the point plus the guest's two writes, byte for byte
            _assert_point_plus_guest_writes(raw, disk)

            done = await wait_job(api, (await api.post(
                "/api/v1/items/web01/cleanup-test-failover",
                {"notes": "instant drill: booted from the vault, pivoted"}))["job"]["id"],
                timeout=300)
            assert done["state"] == "succeeded", done
        assert _virsh(uri, "domuuid", VM).returncode != 0, "the domain is still defined"
        assert list(images.iterdir()) == []
        assert list((data_dir / "failover-work").glob("*")) == []
    finally:
        for d in (first, second):
            if d is not None and d.proc is not None and d.proc.returncode is None:
                await d.stop()
        if _virsh(uri, "domuuid", VM).returncode == 0:  # a failure above: nothing left
            _virsh(uri, "destroy", VM)
            _virsh(uri, "undefine", VM)


@pytest.mark.usefixtures("no_leftover_domains")
async def test_instant_failover_finishes_a_block_copy_left_running_by_a_kill9_and_commits(
        uri: str, failover_net: str, images: Path, disk: bytes, tmp_path: Path) -> None:
    """``failover start --instant``: booted on the NBD disk, hydrated at full speed; a
    block copy that ends before it is ready (aborted) is started again; the
    configuration server is killed (kill -9) while QEMU runs that copy onto the
    local image. The copy job outlives it in QEMU (held paused over the kill, so that
    none of its reads meets the dead server); the restarted server finds that job,
    waits for it to be ready and pivots: no second copy, no reboot, the image is the
    point plus the guest's writes. Then the failover is committed."""
    data_dir = tmp_path / "cs"
    args = _daemon_args(tmp_path, uri, images, libvirt_network=failover_net)
    first, second = Daemon(args, "configserver_started"), None
    folder = images / FAILOVER_VM
    console = folder / "console.log"
    try:
        ready = await first.start()
        token = (data_dir / "api-token").read_text().strip()
        async with ApiClient(f"http://127.0.0.1:{ready['port']}", token) as api:
            point = await _protect(api, data_dir, ready, tmp_path, disk)
            await api.call("PATCH", "/api/v1/items/web01/recovery", {
                "target": "libvirt", "vm_name": FAILOVER_VM, "memory_mib": 256,
                "boot_marker": MARKER}, {})
            jid = (await api.post("/api/v1/items/web01/failover",
                                  {"instant": True}))["job"]["id"]
            await first.wait_events("instant_block_copy_started", 1, timeout=DRILL_BOUND)
            # a copy that ends before it is ready (aborted here) is started again
            aborted = _virsh(uri, "blockjob", FAILOVER_VM, "vda", "--abort")
            assert aborted.returncode == 0, aborted.stderr
            again = await first.wait_events("instant_block_copy_started", 2)
            (ended,) = first.events("instant_block_copy_ended")
            assert (ended["attempt"], again[1]["attempt"]) == (1, 2)
            job = _copy_job(uri, FAILOVER_VM)
            assert job is not None, "no copy job in QEMU after the copy started"
            _qmp(uri, FAILOVER_VM, "block-job-pause", device=job["device"])
            held = await _copy_job_paused(uri, FAILOVER_VM)
            if held["ready"]:  # caught up already: a ready copy reads nothing more
                _qmp(uri, FAILOVER_VM, "block-job-resume", device=job["device"])
            before = await api.get(f"/api/v1/jobs/{jid}")
        await first.kill9()
        assert _copy_job(uri, FAILOVER_VM) is not None, "the copy job ended with its server"
        assert step(before, "hydrate")["state"] == "running", before

        second = Daemon(args, "configserver_started")
        ready = await second.start()
        (found,) = await second.wait_events("instant_block_copy_found", 1,
                                            timeout=DRILL_BOUND)
        assert (found["disk"], found["ready"]) == ("vda", "yes" if held["ready"] else "no")
        if not held["ready"]:  # the restarted server waits for it: let it go on
            _qmp(uri, FAILOVER_VM, "block-job-resume", device=job["device"])
        async with ApiClient(f"http://127.0.0.1:{ready['port']}", token) as api:
            done = await wait_job(api, jid, timeout=DRILL_BOUND)
            assert done["state"] == "succeeded" and done["attempts"] == 2, (
                done["error"], [ln for ln in second.lines if "instant_" in ln])
            assert [s["name"] for s in done["steps"]] == [
                "prerequisites", "shutdown_source", "stop_replication", "select_point",
                "create", "verify", "boot", "hydrate", "record"]
            assert step(done, "hydrate")["attempts"] == 2
            moved = step(done, "hydrate")["message"]
            assert "without a reboot (block copy: vda: a copy found running in QEMU, " \
                   "waited for)" in moved, moved
            assert not second.events("instant_block_copy_started")  # no second copy
            item = await api.get("/api/v1/items/web01")
            rec = item["failover"]
            assert (item["state"], rec["point"], rec["instant"]) == (
                "failed_over", point, True)
            assert "sda: ext4 clean" in step(done, "verify")["message"]
            assert rec["boot"]["booted"] is True
            assert rec["boot"]["matched"] == f"{MARKER} hostname={HOSTNAME} drill=bootdisk-v1"
            assert rec["local_at_boot_percent"] < 20, rec

            # running on the local image, on the failover's network, its definition too
            raw = folder / "00-sda.raw"
            assert _virsh(uri, "domstate", FAILOVER_VM).stdout.strip() == "running"
            assert str(raw) in _virsh(uri, "domblklist", FAILOVER_VM).stdout
            assert failover_net in _virsh(uri, "domiflist", FAILOVER_VM).stdout
            inactive = _virsh(uri, "dumpxml", "--inactive", FAILOVER_VM).stdout
            assert "protocol='nbd'" not in inactive and f"file='{raw}'" in inactive
            assert _copy_job(uri, FAILOVER_VM) is None
            assert not list(folder.glob("*.sock")) and not list(folder.glob("*.overlay"))

            # one boot; the guest goes on reading its disk, now the local image
            _n, digest = await _alive_after(console, _alive(console)[-1][0] + 1)
            assert digest == GOOD
            assert {d for _n, d in _alive(console)} <= {GOOD, FAILED}, _console(console)
            text = _console(console)
            assert text.count("siterecovery-init: waiting") == 1, text
            assert text.count(MARKER) == 1, text
            _assert_point_plus_guest_writes(raw, disk)

            committed = await wait_job(api, (await api.post(
                "/api/v1/items/web01/commit", {}))["job"]["id"], timeout=300)
            assert committed["state"] == "succeeded", committed
            assert step(committed, "delete_vault_points")["message"].startswith(
                "1 point(s) deleted from the vault")
            assert (await api.get("/api/v1/items/web01"))["state"] == "committed"
            # the committed machine is the operator's now: it runs on
            assert _virsh(uri, "domstate", FAILOVER_VM).stdout.strip() == "running"
    finally:
        for d in (first, second):
            if d is not None and d.proc is not None and d.proc.returncode is None:
                await d.stop()
        if _virsh(uri, "domuuid", FAILOVER_VM).returncode == 0:
            _virsh(uri, "destroy", FAILOVER_VM)
            _virsh(uri, "undefine", FAILOVER_VM)


async def test_instant_is_refused_by_a_target_that_cannot(cs: ConfigServer, api: ApiClient,
                                                         tmp_path: Path) -> None:
    await add_machine(api, "web02", disks=("sda",))
    # the item exists from here on (enabling): the refusal comes before any state check
    await api.post("/api/v1/replication/enable", {"machine": "web02"})
    with pytest.raises(ApiCallError) as e:
        await api.post("/api/v1/items/web02/test-failover", {"instant": True})
    assert (e.value.status, e.value.api_code) == (422, "instant_not_supported"), e.value
    assert "the folder target cannot do instant recovery" in e.value.message


def test_domain_xml_of_nbd_disks_and_its_move_onto_local_images(tmp_path: Path) -> None:
    spec = RecoverySpec(machine="web01", vm_name="vm1")
    sock, image = tmp_path / "00-sda.sock", tmp_path / "00-sda.raw"
    xml = domain_xml(spec, DomainLayout("qemu", [NbdSource(sock), tmp_path / "b.raw"],
                                        "52:54:00:00:00:01", "net", tmp_path / "c.log"))
    disks = ET.fromstring(xml).findall("devices/disk")
    assert [d.get("type") for d in disks] == ["network", "file"]
    src = disks[0].find("source")
    assert src is not None and src.get("protocol") == "nbd"
    host = src.find("host")
    assert host is not None and (host.get("transport"), host.get("socket")) == (
        "unix", str(sock))
    moved = ET.fromstring(with_local_disks(xml, {"vda": image})).findall("devices/disk")
    assert [d.get("type") for d in moved] == ["file", "file"]
    assert [d.find("source").get("file") for d in moved  # type: ignore[union-attr]
            ] == [str(image), str(tmp_path / "b.raw")]
    assert [d.find("target").get("dev") for d in moved] == ["vda", "vdb"]  # type: ignore[union-attr]


def test_instant_recoveries_have_their_own_steps() -> None:
    kinds = {k.name: k for k in failover.kinds(FailoverDeps(targets={}, work_root=Path("/x")))}
    drill, start = kinds["test_failover"], kinds["failover"]
    instant = ["create", "verify", "boot", "hydrate", "record"]
    assert [s.name for s in drill.steps_of({"instant": True})] == [
        "prerequisites", "select_point", *instant]
    assert [s.name for s in start.steps_of({"instant": True})] == [
        "prerequisites", "shutdown_source", "stop_replication", "select_point", *instant]
    assert [s.name for s in start.steps_of({})] == [
        "prerequisites", "shutdown_source", "stop_replication", "select_point", "restore",
        "verify", "create", "boot", "record"]
