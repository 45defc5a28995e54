"""The libvirt target on a real libvirtd and QEMU: a drill of the boot disk boots, an
unbootable disk fails at the boot step with the console's last lines, cleanup leaves
nothing (checked with virsh), and check refuses bad settings by name. Four VM boots
(two full ones of one machine, two that stop in the firmware)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from targets.base import BootFailedError, RecoveryDisk, RecoverySpec, TargetError
from targets.console import ConsoleLog
from targets.domainxml import isolated_network_xml
from targets.kvm import probe_kvm
from targets.libvirt import LibvirtTarget
from targets.virsh import Virsh
from tests.backends import missing_backend, traversable
from tests.bootdisk import DRILL_TEXT, HOSTNAME, MARKER, bootdisk, missing_tools
from tests.libvirtd import isolated_network, libvirtd_running

DRILL_NET = "sr-test-drill"
BOOT_BOUND = 240.0  # seconds: a bound for an emulated boot, not a measurement
FAIL_BOUND = 30.0  # the unbootable disk shows SeaBIOS's lines within seconds


@pytest.fixture(scope="module")
def uri() -> Iterator[str]:
    with libvirtd_running() as u:
        yield u


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the emulator runs as libvirt-qemu: it must traverse down to the images
    return traversable(tmp_path_factory.mktemp("libvirt-pool"))


@pytest.fixture(scope="module")
def disk_image() -> Path:
    if os.geteuid() != 0:
        missing_backend("root (the boot disk's loop mount)", "run the suite as root")
    if missing := missing_tools():
        missing_backend(", ".join(missing), "tests/run.sh installs fdisk and e2fsprogs")
    return bootdisk()


@pytest.fixture
def target(uri: str, pool: Path) -> LibvirtTarget:
    return LibvirtTarget(uri=uri, pool_dir=pool / "images", drill_network=DRILL_NET,
                         drill_bridge="virbr-srtest", drill_subnet="10.213.0.0/24")


def virsh(uri: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", uri, *argv], capture_output=True, text=True)


def _copy_disk(src: Path, dst: Path) -> RecoveryDisk:
    shutil.copyfile(src, dst)
    return RecoveryDisk("sda", dst, dst.stat().st_size)


def _assert_nothing_left(uri: str, vm: str, folder: Path) -> None:
    assert virsh(uri, "domuuid", vm).returncode != 0, "the domain is still defined"
    assert DRILL_NET not in virsh(uri, "net-list", "--all", "--name").stdout.split()
    assert not folder.exists(), list(folder.iterdir())


def _until_shut_off(uri: str, vm: str) -> None:
    """Poll for the guest's own poweroff (a condition; the suite's timeout bounds it)."""
    while virsh(uri, "domstate", vm).stdout.strip() != "shut off":
        time.sleep(0.2)


async def test_drill_boots_and_cleanup_leaves_nothing(
        target: LibvirtTarget, uri: str, disk_image: Path, tmp_path: Path) -> None:
    disk = _copy_disk(disk_image, tmp_path / "restored.raw")
    spec = RecoverySpec(machine="web1", vm_name="sr-test-drill-ok", cpus=1, memory_mib=256,
                        drill=True, ip="10.213.0.50", mac="52:54:00:aa:bb:01",
                        boot_marker=MARKER)
    assert await target.check(spec, [disk]) == []
    rec = await target.create(spec, [disk])
    folder = target.pool_dir / spec.vm_name
    try:
        # what it planned (the job records it first) names all it made, files in the folder
        planned = target.planned(spec, [disk]).resources
        assert [r for r in rec.resources if not r.startswith("file:")] == [
            r for r in planned if not r.startswith("instant:")]
        assert rec.resources == [
            f"dir:{folder}", f"file:{folder}/00-sda.raw", f"file:{folder}/console.log",
            f"network:{DRILL_NET}", f"dhcp-host:{DRILL_NET}|52:54:00:aa:bb:01|10.213.0.50",
            f"domain:{spec.vm_name}"]
        assert rec.details["virt_type"] == ("kvm" if probe_kvm().usable else "qemu")
        xml = virsh(uri, "dumpxml", spec.vm_name).stdout
        assert f"type='{rec.details['virt_type']}'" in xml
        assert "<memory unit='KiB'>262144</memory>" in xml
        assert "<mac address='52:54:00:aa:bb:01'/>" in xml
        assert f"<source network='{DRILL_NET}'/>" in xml
        assert f"<source file='{folder}/00-sda.raw'/>" in xml and "dev='vda' bus='virtio'" in xml
        net = virsh(uri, "net-dumpxml", DRILL_NET).stdout
        assert "<forward" not in net  # isolated: no route out of the drill
        assert "<host mac='52:54:00:aa:bb:01' name='sr-test-drill-ok' ip='10.213.0.50'/>" in net
        # a second recovery under the same name is refused while this one exists
        [refusal] = await target.check(spec, [disk])
        assert refusal.setting == "vm_name" and "already exists" in refusal.message

        proof = await target.boot(rec, BOOT_BOUND)
        assert proof.matched == f"{MARKER} hostname={HOSTNAME} drill={DRILL_TEXT}"
        assert proof.seconds > 0
        assert proof.console_tail[-1:] != [] and any("SYSLINUX" in ln
                                                     for ln in proof.console_tail)

        # booted again, waiting for a marker this disk never prints: its init powers the
        # machine off, which ends the wait at once with the console's lines
        _until_shut_off(uri, spec.vm_name)
        rec.details["boot_marker"] = "a-marker-never-printed"
        with pytest.raises(BootFailedError, match="stopped before it showed") as e:
            await target.boot(rec, BOOT_BOUND)
        assert any(MARKER in ln for ln in e.value.console_tail), e.value.console_tail
    finally:
        await target.cleanup(rec)
    _assert_nothing_left(uri, spec.vm_name, folder)
    await target.cleanup(rec)  # again: everything is already gone, which is not an error


# The MBR's boot code replaced by `jmp $` (EB FE), the partition table kept: the machine
# hangs in its boot sector. (Zeroed boot code is no hang: the CPU runs on through the
# table into memory whose contents depend on timing, and once it reached SeaBIOS's
# "No bootable device.") Or the whole sector zeroed, signature included.
HANG = b"\xeb\xfe" + bytes(438)


@pytest.mark.parametrize("sector, why, started_before", [
    # the hang. Started by an earlier run of the job (resumed after a restart): boot
    # follows the running machine instead of failing to start it again.
    (HANG, "showed no siterecovery-boot-ok on its console within", True),
    # no signature: the firmware gives up at once (the line may be read before its last
    # character: 'No bootable device' is enough)
    (bytes(512), "cannot boot: its console shows 'No bootable device", False),
], ids=["hangs", "no-signature"])
async def test_unbootable_disk_fails_at_boot_and_cleanup_removes_it(
        target: LibvirtTarget, uri: str, disk_image: Path, tmp_path: Path,
        sector: bytes, why: str, started_before: bool) -> None:
    disk = _copy_disk(disk_image, tmp_path / "restored.raw")
    with open(disk.path, "r+b") as f:
        f.write(sector)
    spec = RecoverySpec(machine="web2", vm_name=f"sr-test-bad-{len(sector)}", memory_mib=256,
                        drill=True, boot_marker=MARKER)
    rec = await target.create(spec, [disk])
    folder = target.pool_dir / spec.vm_name
    try:
        if started_before:
            assert virsh(uri, "start", spec.vm_name).returncode == 0
        with pytest.raises(BootFailedError) as e:
            await target.boot(rec, FAIL_BOUND)
        assert why in e.value.message
        assert e.value.code == "boot_failed" and e.value.hint
        assert e.value.console_tail, "the console's last lines are empty"
        assert any("Booting from Hard Disk" in ln for ln in e.value.console_tail), \
            e.value.console_tail
        assert not any(MARKER in ln for ln in e.value.console_tail)
        # stopped, but still defined: cleanup is what removes it
        assert virsh(uri, "domstate", spec.vm_name).stdout.strip() == "shut off"
    finally:
        await target.cleanup(rec)
    _assert_nothing_left(uri, spec.vm_name, folder)


@pytest.fixture(scope="module")
def production_net(uri: str) -> Iterator[str]:
    """A stand-in for the operator's production network (isolated too: tests send no
    traffic), made and removed by the test, never by the target."""
    with isolated_network(uri, "sr-test-prod", "virbr-srtprod", "10.214.0.0/24") as name:
        yield name


async def test_failover_goes_on_its_network_with_a_dhcp_reservation(
        uri: str, pool: Path, production_net: str, tmp_path: Path) -> None:
    target = LibvirtTarget(uri=uri, pool_dir=pool / "images", network="sr-no-default",
                           drill_network=DRILL_NET)
    img = tmp_path / "d.raw"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    disks = [RecoveryDisk("sda", img, 1 << 20), RecoveryDisk("sdb", img, 1 << 20)]
    outside = RecoverySpec(machine="db1", vm_name="sr-test-failover", network=production_net,
                           ip="192.0.2.10")
    [refusal] = await target.check(outside, disks)
    assert refusal.setting == "ip" and "outside network 'sr-test-prod' (10.214.0.0/24)" \
        in refusal.message
    spec = RecoverySpec(machine="db1", vm_name="sr-test-failover", cpus=2, memory_mib=128,
                        network=production_net, ip="10.214.0.20")
    assert await target.check(spec, disks) == []
    rec = await target.create(spec, disks)
    folder = target.pool_dir / spec.vm_name
    try:
        mac = rec.details["mac"]
        assert mac.startswith("52:54:00:")  # none given: a stable one from the name
        assert rec.resources == [
            f"dir:{folder}", f"file:{folder}/00-sda.raw", f"file:{folder}/01-sdb.raw",
            f"file:{folder}/console.log", f"dhcp-host:{production_net}|{mac}|10.214.0.20",
            f"domain:{spec.vm_name}"]
        xml = virsh(uri, "dumpxml", spec.vm_name).stdout
        assert f"<source network='{production_net}'/>" in xml and "<vcpu placement='static'>2" \
            in xml
        assert "dev='vda' bus='virtio'" in xml and "dev='vdb' bus='virtio'" in xml
        assert f"<host mac='{mac}' name='sr-test-failover' ip='10.214.0.20'/>" in \
            virsh(uri, "net-dumpxml", production_net).stdout
        assert DRILL_NET not in virsh(uri, "net-list", "--all", "--name").stdout.split()
    finally:
        await target.cleanup(rec)
    assert virsh(uri, "domuuid", spec.vm_name).returncode != 0 and not folder.exists()
    net = virsh(uri, "net-dumpxml", production_net).stdout
    assert "<host " not in net  # the reservation went with the machine; the network stays
    await target.cleanup(rec)  # again, with the reservation already gone from the network


async def test_check_refuses_bad_settings_by_name(
        uri: str, pool: Path, tmp_path: Path) -> None:
    target = LibvirtTarget(uri=uri, pool_dir=pool / "images", network="sr-no-such-net")
    img = tmp_path / "d.raw"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"x" * 1000)
    spec = RecoverySpec(machine="m", vm_name="-bad name", cpus=0, memory_mib=16,
                        mac="01:00:5e:00:00:01", firmware="coreboot", boot_marker="a\nb")
    disks = [RecoveryDisk("sda", img, 1 << 20), RecoveryDisk("sda", tmp_path / "gone.raw", 512),
             RecoveryDisk("sdc", odd, 1000)]
    refusals = await target.check(spec, disks)
    by: dict[str, list[str]] = {}
    for r in refusals:
        by.setdefault(r.setting, []).append(r.message)
    assert set(by) == {"vm_name", "cpus", "memory_mib", "disks", "mac", "firmware",
                       "boot_marker", "network"}
    assert "'-bad name'" in by["vm_name"][0]
    assert "0: 1 to " in by["cpus"][0] and "16: 64 to " in by["memory_mib"][0]
    assert any("repeat" in m for m in by["disks"])
    assert not any("no image at" in m for m in by["disks"])  # checked before the restore
    assert any("multiple of 512" in m for m in by["disks"])
    assert "bios or uefi" in by["firmware"][0]
    assert "'sr-no-such-net' is not a network" in by["network"][0]
    with pytest.raises(TargetError) as e:  # create refuses the same, and makes nothing
        await target.create(spec, disks)
    assert e.value.code == "spec_refused" and "vm_name:" in e.value.message
    assert not (pool / "images" / "-bad name").exists()
    # an image still missing at create (the restore did not make it) is refused there
    gone = [RecoveryDisk("sda", tmp_path / "gone.raw", 512)]
    assert await target.check(RecoverySpec(machine="m", vm_name="sr-test-gone", drill=True),
                              gone) == []
    with pytest.raises(TargetError, match="sda: no image at") as e:
        await target.create(RecoverySpec(machine="m", vm_name="sr-test-gone", drill=True),
                            gone)
    assert e.value.code == "spec_refused" and not (pool / "images" / "sr-test-gone").exists()
    bad_ip = RecoverySpec(machine="m", vm_name="ok", ip="10.0.0.300")
    assert [r.setting for r in await target.check(bad_ip, disks[:1])] == ["ip"]


def test_console_log_reads_as_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path)
    assert log.find(lambda ln: True) == "" and log.tail() == []  # not there yet: empty
    path.write_bytes(b"\x1b[2J\x1b[1;1HSeaBIOS\r\nBooting from Hard Disk...\r\nweb1 log")
    assert log.find(lambda ln: "login:" in ln) is None
    with open(path, "ab") as f:
        f.write(b"in: ")
    assert log.find(lambda ln: "login:" in ln) == "web1 login:"
    assert log.tail() == ["SeaBIOS", "Booting from Hard Disk...", "web1 login:"]
    assert log.tail(1) == ["web1 login:"]


def test_kvm_probe_explains_itself(tmp_path: Path) -> None:
    probe = probe_kvm(device=tmp_path / "no-kvm")
    assert not probe.usable and "no-kvm" in probe.reason
    if Path("/dev/kvm").exists() and os.access("/dev/kvm", os.R_OK | os.W_OK):
        probe = probe_kvm()
        hardware = any(Path("/sys/module", m).exists() for m in ("kvm_intel", "kvm_amd"))
        assert probe.usable == hardware, probe.reason


def test_definitions_work_on_the_daemons_event_loop(uri: str) -> None:
    """The daemons run on uvloop, whose subprocess pipes are socket pairs that virsh
    cannot open as /dev/stdin: a network defined there (and removed) the way the target
    defines its drill network and domains."""
    virsh = Virsh(uri)

    async def define_and_remove() -> bool:
        xml = isolated_network_xml("sr-test-uvloop", "virbr-sruv",
                                   ipaddress.IPv4Network("10.216.0.0/24"))
        await virsh.define("net-define", xml)
        try:
            return await virsh.exists("network", "sr-test-uvloop")
        finally:
            await virsh.gone("net-undefine", "sr-test-uvloop")

    assert uvloop.run(define_and_remove())
    assert not uvloop.run(virsh.exists("network", "sr-test-uvloop"))


async def test_create_after_an_interrupted_create_of_the_same_recovery(
        target: LibvirtTarget, uri: str, pool: Path, tmp_path: Path) -> None:
    """A configuration server killed during create never recorded what it made: the same
    recovery made again replaces it; a folder another recovery began is never reused."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    disk = RecoveryDisk("sda", image, 1 << 20)
    spec = RecoverySpec(machine="web1", vm_name="sr-test-resume", cpus=1, memory_mib=128,
                        drill=True, ip="10.213.0.77", point="p1")
    folder = pool / "images" / spec.vm_name
    first = await target.create(spec, [disk])
    try:
        with pytest.raises(TargetError) as e:  # whole: its recovery's to clean up
            await target.create(spec, [disk])
        assert e.value.code == "spec_refused" and "already exists" in e.value.message
        # what a create killed after the define, before it was whole, leaves behind
        owner = folder / "recovery.json"
        doc = json.loads(owner.read_text())
        assert doc.pop("complete") is True
        owner.write_text(json.dumps(doc))
        again = await target.create(spec, [disk])
        assert again.resources == first.resources
        assert virsh(uri, "domuuid", spec.vm_name).returncode == 0
        await target.cleanup(again)
        _assert_nothing_left(uri, spec.vm_name, folder)

        other = await target.create(spec, [disk])
        with pytest.raises(TargetError) as e:  # another point's recovery: not ours to remove
            await target.create(dataclasses.replace(spec, point="p2"), [disk])
        assert e.value.code == "spec_refused" and "already exists" in e.value.message
        assert virsh(uri, "domuuid", spec.vm_name).returncode == 0
        await target.cleanup(other)
    finally:
        await target.cleanup(first)
    _assert_nothing_left(uri, spec.vm_name, folder)
