"""Instant recovery on libvirt end to end (one VM boot): the bootable test disk, as a
point in a real vault, drilled with ``--instant`` through the configuration server's
API on a real libvirtd. The machine boots on NBD disks served from the vault with less
than a fifth of the point's data local; the guest writes (a block that was a hole, a
block not fetched yet); hydration completes at its rate; the running machine moves onto
the local image without a reboot, and that image holds the point plus the guest's
writes, byte for byte; the cleanup leaves nothing.

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

import pytest

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from targets.base import RecoverySpec
from targets.domainxml import DomainLayout, NbdSource, domain_xml, with_local_disks
from tests.backends import missing_backend
from tests.bootdisk import (
    HOSTNAME,
    MARKER,
    PART_START,
    _Cpio,  # the initramfs format the boot disk is built with
    bootdisk,
    missing_tools,
)
from tests.helpers import make_vault, open_vault, write_full_point
from tests.libvirtd import libvirtd_running
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

VM = "sr-instant-web01"
DRILL_SUBNET = "10.216.0.0/24"  # not another libvirt test's
DRILL_BOUND = 900.0  # seconds for the whole drill under emulation: a bound, not a measure
RATE_MBPS = 200.0  # hydration's rate
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


def _need_root_tools() -> None:
    if os.geteuid() != 0:
        missing_backend("root (loop devices, libvirtd)", "run the suite as root")
    for tool in ("losetup", "mount", "umount", "e2fsck", "virsh", "nbdfuse"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs util-linux, e2fsprogs, libvirt "
                                  "and libnbd-bin")
    if not Path("/dev/fuse").exists():
        missing_backend("/dev/fuse", "the disk checks read an NBD disk through FUSE")
    if missing := missing_tools():
        missing_backend(", ".join(missing), "tests/run.sh installs fdisk and e2fsprogs")


def _run(*argv: str | Path) -> str:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res.stdout


def _virsh(uri: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", uri, *argv], capture_output=True, text=True)


@pytest.fixture(scope="module")
def uri() -> Iterator[str]:
    _need_root_tools()
    with libvirtd_running() as u:
        yield u


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
        extra = _Cpio()  # a second archive: the kernel unpacks it over the first
        extra.add("init", 0o100755, INIT.encode())
        extra.add("guest-write.bin", 0o100644, GUEST_BLOCK)
        with open(mnt / "boot" / "initrd.gz", "ab") as f:
            f.write(gzip.compress(extra.finish(), mtime=0))
    finally:
        _run("umount", mnt)
    data = img.read_bytes() + os.urandom(FILLER_MIB << 20)
    img.unlink()
    return data


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """The libvirt target's image folder; the emulator (libvirt-qemu) must traverse to it."""
    d = tmp_path / "lv"
    d.mkdir()
    for p in [d, *d.parents]:
        if p == Path("/tmp") or p == p.parent:
            break
        p.chmod(p.stat().st_mode | 0o011)
    return d


@pytest.fixture
async def cs(tmp_path: Path, uri: str, images: Path) -> AsyncIterator[ConfigServer]:
    """SQLite only: one VM boot for the module (the catalog is tested on both elsewhere)."""
    server = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}",
        libvirt_uri=uri, libvirt_image_dir=str(images), libvirt_drill_subnet=DRILL_SUBNET))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def api(cs: ConfigServer) -> AsyncIterator[ApiClient]:
    async with ApiClient(cs.url, cs.admin_token) as client:
        yield client


async def _protect(cs: ConfigServer, api: ApiClient, tmp: Path, data: bytes) -> str:
    """web01 protected, with one full point of ``data`` as its disk sda; the point."""
    url, key = await make_vault(tmp)
    vault = await open_vault(tmp / "vault", key)
    try:
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
        await add_procserver(cs.url, cs.internal_token)
        await add_machine(api, "web01", disks=("sda",))
        agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01", cs.passphrase,
                                       tmp / "agent")
        jid = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]["id"]
        async with agent:
            assert (await agent.heartbeat("2.0.0"))[0] == 200
            assert (await agent.progress({"sda": 100}))[0] == 200
        point = await write_full_point(vault, data, machine="web01")
        await report_point(cs.url, cs.internal_token, "web01", point.id, point.created,
                           point.consistency)
    finally:
        await vault.close()
    assert (await wait_job(api, jid))["state"] == "succeeded"
    fin = await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
    assert fin["state"] == "succeeded", fin
    return point.id


def _console(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _alive_after(console: Path, n: int, bound: float = 120.0) -> tuple[int, str]:
    """The first "alive" line numbered above ``n`` (the guest reads its disk each
    second), polling the console log until it appears or ``bound`` ends."""
    deadline = time.monotonic() + bound
    while True:
        found = [(int(m[1]), m[2]) for m in ALIVE.finditer(_console(console))]
        later = [f for f in found if f[0] > n]
        if later:
            return later[0]
        assert time.monotonic() < deadline, f"no alive line after {n}: {_console(console)}"
        await asyncio.sleep(0.5)


async def test_instant_drill_boots_from_the_vault_then_pivots_without_reboot(
        cs: ConfigServer, api: ApiClient, uri: str, images: Path, disk: bytes,
        tmp_path: Path) -> None:
    point = await _protect(cs, api, tmp_path, disk)
    await api.call("PATCH", "/api/v1/items/web01/recovery", {
        "target": "libvirt", "vm_name": VM, "memory_mib": 256, "boot_marker": MARKER}, {})
    jid = (await api.post("/api/v1/items/web01/test-failover", {
        "instant": True, "hydrate_rate_mbps": RATE_MBPS}))["job"]["id"]
    job = await wait_job(api, jid, timeout=DRILL_BOUND)
    folder = images / VM
    console = folder / "console.log"
    try:
        assert job["state"] == "succeeded", job
        assert [s["name"] for s in job["steps"]] == [
            "prerequisites", "select_point", "create", "verify", "boot", "hydrate", "record"]
        drill = (await api.get("/api/v1/items/web01"))["last_drill"]
        assert (drill["point"], drill["instant"], drill["result"]) == (point, True,
                                                                      "succeeded")
        # checked through the server, booted on it with less than a fifth local
        assert "sda: ext4 clean" in step(job, "verify")["message"]
        proof = f"{MARKER} hostname={HOSTNAME} drill=bootdisk-v1"
        assert drill["boot"]["booted"] is True and drill["boot"]["matched"] == proof
        assert drill["local_at_boot_percent"] < 20, drill
        assert drill["rto_seconds"] >= drill["boot"]["seconds"]
        hydrate = step(job, "hydrate")
        assert f"{RATE_MBPS:g} Mbit/s" in hydrate["message"], hydrate
        assert "without a reboot" in hydrate["message"]

        # on the local image now, in the running domain and in its definition
        raw = folder / "00-sda.raw"
        assert _virsh(uri, "domstate", VM).stdout.strip() == "running"
        assert str(raw) in _virsh(uri, "domblklist", VM).stdout
        inactive = _virsh(uri, "dumpxml", "--inactive", VM).stdout
        assert "protocol='nbd'" not in inactive and f"file='{raw}'" in inactive
        assert not list(folder.glob("*.sock")) and not list(folder.glob("*.overlay"))

        # no second boot; the guest goes on reading its disk, now the local image
        seen = [int(m[1]) for m in ALIVE.finditer(_console(console))]
        _n, digest = await _alive_after(console, max(seen, default=0) + 1)
        assert digest == hashlib.md5(GUEST_BLOCK).hexdigest()[:12]
        text = _console(console)
        assert text.count("siterecovery-init: waiting") == 1, text
        assert text.count(MARKER) == 1, text

        # the image: the point plus the guest's two writes, byte for byte
        want = bytearray(disk)
        for sector in (HOLE_SECTOR, DATA_SECTOR):
            want[sector * SECTOR:(sector + 1) * SECTOR] = GUEST_BLOCK
        got = raw.read_bytes()
        assert len(got) == len(want)
        assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), \
            f"first difference at byte {next(i for i in range(len(got)) if got[i] != want[i])}"
    finally:
        done = await wait_job(api, (await api.post(
            "/api/v1/items/web01/cleanup-test-failover",
            {"notes": "instant drill: booted from the vault, pivoted"}))["job"]["id"],
            timeout=300)
    assert done["state"] == "succeeded", done
    assert _virsh(uri, "domuuid", VM).returncode != 0, "the domain is still defined"
    assert list(images.iterdir()) == []
    assert list((Path(cs.cfg.data_dir) / "failover-work").glob("*")) == []


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
