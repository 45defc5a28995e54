"""The whole cycle on libvirt with a real bootable disk, every part real: a configuration
server with the libvirt target, a process server, the original machine's managed agent
replicating the boot disk (an image file), a real libvirtd running the machines emulated.

protect → failover onto libvirt (the recovered machine boots and, running, writes a file
*itself*, from inside the guest) → re-protect refused while it runs, unless read paused
(read on the host: only the blocks it changed; it runs on) → the operator shuts it down
→ re-protect (the next delta) → it runs again and writes another file → re-protect
while it runs, its disks copied at one moment by a libvirt backup, never paused → failback (shuts
it down itself, takes the last delta, writes onto the original disk only the blocks that
differ; the disk then equals the failback point, byte for byte) → replication in the
original direction (a delta, no initial copy) → the original disk boots on libvirt and
holds both files → its next point is a delta that restores byte-exact.

The guest's init (a second initramfs archive over the boot disk's, as in
test_instant_libvirt) mounts the root read-write, prints every file under ``/srv`` with
its MD5, writes one more file of random data and prints its MD5, prints the boot line
and runs on; busybox's acpid answers the ACPI power button (``virsh shutdown``) with a
sync, an unmount and a power-off. The files of one boot are proven on the console of
the next, on another machine. The tests send nothing to the machines' addresses. Three
boots."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from targets import libvirtboot
from targets.base import RecoverySpec
from targets.domainxml import DomainLayout, domain_xml
from targets.virsh import Virsh
from tests import libvirtfixtures
from tests.bootdisk import INIT_HEAD, PART_START, Cpio, bootdisk
from tests.helpers import open_vault, run_cli
from tests.libvirtd import isolated_network
from tests.managedsite import Site, managed_site
from tests.sitehelpers import next_job, step, wait_job
from vault.regkey import make_key
from vault.restore import restore_point

pytestmark = pytest.mark.root
uri, images = libvirtfixtures.uri, libvirtfixtures.images  # the shared fixtures
VM = "srfb-web01"  # the recovered machine
ORIGINAL = "srfb-original"  # the original machine's disk booted after the failback
NET, BRIDGE, SUBNET = "srfb-net", "virbr-srfb", "10.224.0.0/24"  # not another test's
DRILL_SUBNET = "10.220.0.0/24"
MARKER = "srfb-boot-ok"
DISK = 64 << 20  # the boot disk
BOUND = 900.0  # seconds for a job that boots a machine under emulation: a bound

INIT = INIT_HEAD + f"""i=0
while [ ! -b /dev/vda1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if mount -t ext4 -o rw /dev/vda1 /root; then
  mkdir -p /root/srv
  n=1
  for f in /root/srv/*.db; do
    [ -f "$f" ] || continue
    echo "srfb-file $(basename $f) $(md5sum < $f | cut -c1-32)"
    n=$((n + 1))
  done
  dd if=/dev/urandom of=/root/srv/orders-$n.db bs=65536 count=5 2>/dev/null
  echo "srfb-wrote orders-$n.db $(md5sum < /root/srv/orders-$n.db | cut -c1-32)"
  sync
  acpid -f -c /etc/acpi -l /dev/console &
  i=0  # the power button is heard once acpid has the input devices open
  while ! ls -l /proc/$!/fd | grep -q input/event && [ $i -lt 100 ]; do
    sleep 0.1; i=$((i + 1))
  done
  echo "{MARKER} hostname=$(cat /root/etc/hostname)"
else
  echo "siterecovery-boot-failed: cannot mount /dev/vda1 read-write"
  poweroff -f
fi
while true; do sleep 1; done
"""
POWER_BUTTON = """#!/bin/sh
echo "srfb-power-button"
sync
umount /root
poweroff -f
"""
FILE = re.compile(r"srfb-(file|wrote) (\S+) ([0-9a-f]{32})")


def _run(*argv: str | Path) -> str:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res.stdout


def _virsh(uri: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", uri, *argv], capture_output=True, text=True)


@pytest.fixture(scope="module")
def net(uri: str) -> Iterator[str]:
    """The network failovers join (isolated: the guests send nothing), made and removed
    by the test."""
    with isolated_network(uri, NET, BRIDGE, SUBNET) as name:
        yield name


@pytest.fixture
async def catalog_url(tmp_path: Path) -> str:
    """SQLite only: the catalog's dialects are covered by the failback tests."""
    return f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"


@pytest.fixture
async def cs(tmp_path: Path, catalog_url: str, uri: str, net: str, images: Path
             ) -> AsyncIterator[ConfigServer]:
    for vm in (VM, ORIGINAL):  # left by a killed run
        _virsh(uri, "destroy", vm)
        _virsh(uri, "undefine", vm)
    server = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0, database_url=catalog_url,
        libvirt_uri=uri, libvirt_image_dir=str(images), libvirt_network=net,
        libvirt_drill_subnet=DRILL_SUBNET))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        for vm in (VM, ORIGINAL):
            _virsh(uri, "destroy", vm)
            _virsh(uri, "undefine", vm)


def _guest_disk(path: Path) -> None:
    """The boot disk with this module's init (see the module docstring)."""
    shutil.copyfile(bootdisk(), path)
    mnt = path.with_name("mnt")
    mnt.mkdir()
    _run("mount", "-o", f"loop,offset={PART_START * 512}", path, mnt)
    try:
        extra = Cpio()  # a second archive: the kernel unpacks it over the first
        extra.add("init", 0o100755, INIT.encode())
        for d in ("etc", "etc/acpi", "etc/acpi/PWRF"):
            extra.add(d, 0o040755)
        # busybox acpid runs /etc/acpi/PWRF/00000080 when the power button is pressed
        extra.add("etc/acpi/PWRF/00000080", 0o100755, POWER_BUTTON.encode())
        with open(mnt / "boot" / "initrd.gz", "ab") as f:
            f.write(gzip.compress(extra.finish(), mtime=0))
        (mnt / "etc" / "hostname").write_text("web01\n")
    finally:
        _run("umount", mnt)


def _files(console: str) -> dict[str, dict[str, str]]:
    """What a boot's console says: {"file": {name: md5} (found), "wrote": {…}}."""
    out: dict[str, dict[str, str]] = {"file": {}, "wrote": {}}
    for kind, name, md5 in FILE.findall(console):
        out[kind][name] = md5
    return out


def _differing(a: bytes, b: bytes, bs: int) -> int:
    return sum(a[o:o + bs] != b[o:o + bs] for o in range(0, len(a), bs))


async def _until(what: str, cond: Callable[[], Awaitable[bool]], bound: float = 120.0
                 ) -> None:
    """Wait for a real condition (polled), failing with ``what`` after ``bound`` s."""
    deadline = time.monotonic() + bound
    while not await cond():
        assert time.monotonic() < deadline, f"{what} within {bound} s"
        await asyncio.sleep(0.5)


def _shut_off(uri: str, name: str) -> Callable[[], Awaitable[bool]]:
    async def cond() -> bool:
        return _virsh(uri, "domstate", name).stdout.strip() == "shut off"
    return cond


async def _run_job(api: ApiClient, verb: str, body: dict[str, Any]) -> dict[str, Any]:
    return await wait_job(api, (await api.post(f"/api/v1/items/web01/{verb}", body))[
        "job"]["id"], timeout=BOUND)


async def _cli(cs: ConfigServer, *argv: str) -> dict[str, Any]:
    """``siterecovery … --json`` against ``cs``: the job it followed (exit 0 when it
    succeeded, 1 when it failed)."""
    res = await asyncio.to_thread(run_cli, *argv, "--json", "--api", cs.url,
                                  "--token-file", str(cs.cfg.token_path))
    job: dict[str, Any] = json.loads(res.stdout)
    assert res.returncode == (0 if job["state"] == "succeeded" else 1), res.stderr
    return job


def _asking(job: dict[str, Any]) -> bool:
    return "asking" in (step(job, "write_back").get("message") or "")


async def _restored(site: Site, tmp_path: Path, point_id: str) -> tuple[bytes, str, str]:
    """The point restored from the vault: its bytes, the restore's verified digest and
    the point's recorded one."""
    vault = await open_vault(tmp_path / "vault", Path(site.pcfg.vault_key_file))
    try:
        point = await vault.read_point(point_id)
        out = tmp_path / f"restored-{point_id[:12]}"
        (got,) = await restore_point(vault, point, out)
        return Path(got.path).read_bytes(), got.digest, point.disk("sda").digest
    finally:
        await vault.close()


async def test_failover_reprotect_failback_and_back_on_libvirt(
        cs: ConfigServer, api: ApiClient, uri: str, images: Path, tmp_path: Path) -> None:
    async with managed_site(cs, api, tmp_path, make_disk_with=_guest_disk,
                            procserver={"heartbeat_interval_seconds": 1.0}) as site:
        vault = await open_vault(tmp_path / "vault", Path(site.pcfg.vault_key_file))
        try:
            await api.post("/api/v1/registration", {
                "key": json.dumps(make_key(vault, site.pcfg.vault_url, time.time())),
                "vault_key_file": site.pcfg.vault_key_file})
        finally:
            await vault.close()
        bs = (await api.get("/api/v1/policies/default"))["block_size"]
        blocks = DISK // bs
        virsh = Virsh(uri)

        # protected: one initial copy of the original disk (it has never booted)
        job = await next_job(api, "web01", "enable_protection")
        assert await site.managed.round()
        assert (await wait_job(api, job["id"]))["state"] == "succeeded"
        fin = await next_job(api, "web01", "finalize_protection")
        assert (await wait_job(api, fin["id"]))["state"] == "succeeded"
        assert site.managed.last is not None
        await site.ps.wait_point(site.managed.last.cycle)
        original = site.disk.read_bytes()

        # failover onto libvirt: the recovered machine boots and, running, writes a file
        await api.call("PATCH", "/api/v1/items/web01/recovery", {
            "target": "libvirt", "vm_name": VM, "memory_mib": 256, "boot_marker": MARKER}, {})
        done = await _run_job(api, "failover", {"point": "latest"})
        assert done["state"] == "succeeded", done
        assert f"{MARKER} hostname=web01" in step(done, "boot")["message"]
        recovered, console = images / VM / "00-sda.raw", images / VM / "console.log"
        first = _files(console.read_text(errors="replace"))
        assert first["file"] == {} and list(first["wrote"]) == ["orders-1.db"]

        # while it runs its disks are not read: re-protect fails and changes nothing
        refused = await _run_job(api, "reprotect", {})
        assert refused["state"] == "failed"
        assert f"{VM} is running: its disks are read from the host only while it is " \
               "shut off" in refused["error"], refused["error"]
        assert (await api.get("/api/v1/items/web01"))["state"] == "failed_over"

        # unless read paused: only the blocks the recovered machine wrote, and it runs on
        # (its guest idles after its boot line: the image read after is the one read)
        done = await _cli(cs, "failover", "reprotect", "web01", "--pause", "--wait")
        assert done["state"] == "succeeded", done
        assert _virsh(uri, "domstate", VM).stdout.strip() == "running"
        paused_read = recovered.read_bytes()
        changed = _differing(original, paused_read, bs)  # what the guest wrote, in blocks
        assert 0 < changed * 10 < blocks  # bytes sent: changed * bs, a tenth of the disk
        item = await api.get("/api/v1/items/web01")
        fo = item["failover"]
        assert (item["state"], item["direction"]) == ("reprotected", "reverse")
        take = step(done, "take")["message"]
        assert f"{changed} block(s) stored as a delta on point {fo['point']}" in take
        assert "read paused (" in take, take
        rp = fo["reprotect"]
        assert (rp["last_blocks_stored"], rp["last_full"], rp["pausing"]) == (
            changed, False, None)
        assert rp["last_paused_seconds"] is not None

        # the operator shuts it down (the guest answers the power button); a paused
        # domain does not answer: a failback then fails after its shutdown timeout, with
        # nothing written
        _virsh(uri, "shutdown", VM)
        await _until(f"{VM} shut down", _shut_off(uri, VM))
        assert "srfb-power-button" in console.read_text(errors="replace")
        at_reprotect = recovered.read_bytes()
        paused = _virsh(uri, "start", "--paused", VM)
        assert paused.returncode == 0, paused.stderr
        try:
            refused = await _cli(cs, "failover", "failback", "web01", "--shutdown-timeout",
                                 "1", "--wait")
        finally:
            _virsh(uri, "destroy", VM)
        assert refused["state"] == "failed"
        assert f"{VM} is paused, not shut off, 1 s after it was asked to shut down" \
            in refused["error"], refused["error"]
        assert step(refused, "take_disks")["state"] == "skipped"
        assert (await api.get("/api/v1/items/web01"))["state"] == "reprotected"
        assert site.disk.read_bytes() == original and recovered.read_bytes() == at_reprotect

        # re-protect of the shut-off machine: the next delta, what its shutdown wrote
        done = await _run_job(api, "reprotect", {})
        assert done["state"] == "succeeded", done
        shutdown = _differing(paused_read, at_reprotect, bs)
        assert (f"{shutdown} block(s) stored as a delta on point {rp['last_point']}"
                in step(done, "take")["message"])
        assert "read paused" not in step(done, "take")["message"]
        rp = (await api.get("/api/v1/items/web01"))["failover"]["reprotect"]
        assert (rp["points"], rp["last_blocks_stored"], rp["last_paused_seconds"]) == (
            2, shutdown, None)

        # business goes on: the recovered machine runs again and writes another file
        proof = await libvirtboot.boot(virsh, VM, console, MARKER, BOUND)
        assert f"{MARKER} hostname=web01" in proof.matched
        second = _files(console.read_text(errors="replace"))
        assert second["file"] == first["wrote"] and list(second["wrote"]) == ["orders-2.db"]

        # re-protect while it runs, never paused: its disks copied at one moment by a
        # libvirt backup (libvirt's lifecycle events watched meanwhile), only the blocks
        # it wrote since stored, the copy gone after (the guest idles after its boot line:
        # the image read after is the one copied)
        events = await asyncio.create_subprocess_exec(
            "virsh", "-c", uri, "event", "--domain", VM, "--event", "lifecycle", "--loop",
            stdout=asyncio.subprocess.PIPE)
        try:
            done = await _cli(cs, "failover", "reprotect", "web01", "--live", "--wait")
        finally:
            events.terminate()
            out, _ = await asyncio.wait_for(events.communicate(), 30)
        seen = out.decode(errors="replace")
        assert done["state"] == "succeeded", done
        assert "Suspended" not in seen and "Resumed" not in seen, seen
        assert _virsh(uri, "domstate", VM).stdout.strip() == "running"
        at_live = recovered.read_bytes()
        live = _differing(at_reprotect, at_live, bs)
        assert 0 < live * 10 < blocks
        take = step(done, "take")["message"]
        assert (f"{live} block(s) stored as a delta on point {rp['last_point']}; copied "
                "while it ran (") in take, take
        assert not (images / VM / "live-copy").exists()
        rp = (await api.get("/api/v1/items/web01"))["failover"]["reprotect"]
        assert (rp["points"], rp["last_live"], rp["last_paused_seconds"]) == (3, True, None)
        data, digest, recorded = await _restored(site, tmp_path, rp["last_point"])
        assert data == at_live and digest == recorded

        # failback: the running machine is shut down, its last delta taken, and the
        # original disk gets only the blocks that differ
        job = (await api.post("/api/v1/items/web01/failback", {}))["job"]
        await wait_job(api, job["id"], _asking, timeout=BOUND)
        assert "srfb-power-button" in console.read_text(errors="replace")
        at_failback = recovered.read_bytes()  # shut off: what the failback took
        assert not await site.managed.round()  # the agent writes the point and answers
        done = await wait_job(api, job["id"], timeout=BOUND)
        assert done["state"] == "succeeded", done
        last_delta = _differing(at_live, at_failback, bs)
        assert 0 < last_delta * 10 < blocks
        assert (f"{last_delta} block(s) stored as a delta on point {rp['last_point']}"
                in step(done, "take_disks")["message"])
        written = _differing(original, at_failback, bs)
        assert 0 < written * 10 < blocks
        assert (f"{written} of {blocks} block(s) differed and were written "
                f"({written * bs} bytes)") in step(done, "write_back")["message"]
        assert site.disk.read_bytes() == at_failback
        fb = (await api.get("/api/v1/items/web01"))["failover"]["failback"]
        data, digest, recorded = await _restored(site, tmp_path, fb["point"])
        assert data == at_failback and digest == recorded  # the disk is the failback point
        assert _virsh(uri, "domuuid", VM).returncode != 0  # the recovered machine went
        assert not (images / VM).exists()
        item = await api.get("/api/v1/items/web01")
        assert (item["state"], item["direction"]) == ("protected", "forward")

        # the original direction again: a delta on the failback point, nothing to send
        assert await site.managed.round()
        last = site.managed.last
        assert last is not None and (last.kind, last.blocks_sent) == ("delta", 0)

        # the original machine boots from its disk and holds what the recovered one wrote
        text = await _boot_original(uri, site.disk, tmp_path)
        at_original = _files(text)
        assert at_original["file"] == {**first["wrote"], **second["wrote"]}, text
        assert list(at_original["wrote"]) == ["orders-3.db"]
        booted = site.disk.read_bytes()
        moved = _differing(at_failback, booted, bs)
        assert 0 < moved * 10 < blocks

        # its next point: a delta of what its boot wrote, restoring byte-exact
        assert await site.managed.round()
        last = site.managed.last
        assert last is not None and (last.kind, last.blocks_sent) == ("delta", moved)
        data, digest, recorded = await _restored(
            site, tmp_path, await site.ps.wait_point(last.cycle, timeout=120))
        assert data == booted and digest == recorded


async def _boot_original(uri: str, disk: Path, tmp_path: Path) -> str:
    """Boot ``disk`` as a libvirt domain (the original machine, on the failover network)
    until its boot line, then shut it down; its console."""
    console = tmp_path / "original-console.log"
    spec = RecoverySpec(machine="web01", vm_name=ORIGINAL, memory_mib=256,
                        boot_marker=MARKER)
    mac = "52:54:00:5f:b0:" + uuid.uuid4().hex[:2]
    virt = "qemu"  # KVM fails on these machines (DESIGN §6)
    virsh = Virsh(uri)
    await virsh.define("define", domain_xml(spec, DomainLayout(virt, [disk], mac, NET,
                                                              console)))
    try:
        proof = await libvirtboot.boot(virsh, ORIGINAL, console, MARKER, BOUND)
        assert f"{MARKER} hostname=web01" in proof.matched
        _virsh(uri, "shutdown", ORIGINAL)
        await _until(f"{ORIGINAL} shut down", _shut_off(uri, ORIGINAL))
        return console.read_text(errors="replace")
    finally:
        await virsh.gone("destroy", ORIGINAL)
        await virsh.gone("undefine", ORIGINAL)
