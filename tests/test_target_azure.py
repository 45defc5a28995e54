"""The Azure target on Azurite: page-blob VHDs equal the raw disks, uploads skip zeros and
resume, the ARM template reads back through the SDK's models, check refuses what Azure
refuses, cleanup removes the blobs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ServiceRequestError
from azure.storage.blob import ContainerSasPermissions, generate_container_sas
from azure.storage.blob.aio import ContainerClient

from common.backoff import Backoff
from configserver.recovery import RecoverySettings, apply
from targets.armtemplate import (
    DISK,
    MODELS,
    NIC,
    VM,
    DiskPlan,
    VmPlan,
    api_versions,
    build_template,
    template_json,
)
from targets.armtemplate import unknown_properties as template_problems
from targets.azure import AzureSettings, AzureTarget
from targets.azurecheck import check_vm
from targets.base import Recovered, RecoveryDisk, RecoverySpec, TargetError
from targets.pageblob import (
    GRANULE,
    PAGE,
    PageBlobError,
    nonzero_extents,
    upload_vhd,
    written_ranges,
)
from tests import bootimages
from tests.backends import AZURITE_ACCOUNT, AZURITE_KEY, missing_backend
from vault.vhd import FOOTER_SIZE, parse_footer, vhd_size

MIB = 1 << 20
GIB = 1 << 30
ACCOUNT_ID = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/dr/"
              "providers/Microsoft.Storage/storageAccounts/drdisks")

Hook = Callable[[Any], None]


def quick() -> Backoff:
    return Backoff(base=0.001, cap=0.001)


def _open(conn: str, name: str, hook: Hook | None = None) -> ContainerClient:
    kw: dict[str, Any] = {"retry_total": 0}
    if hook is not None:
        kw["raw_request_hook"] = hook
    return ContainerClient.from_connection_string(conn, name, **kw)


@pytest.fixture
async def container(azurite_conn: str) -> AsyncIterator[tuple[str, ContainerClient]]:
    name = "t" + uuid.uuid4().hex[:20]
    c = _open(azurite_conn, name)
    await c.create_container()
    try:
        yield name, c
    finally:
        await c.close()


def make_image(path: Path) -> bytes:
    """A raw disk with data, written zeros, holes, a 4 MiB boundary crossed, and a size
    that is neither whole MiB nor whole 512-byte sectors."""
    size = 9 * MIB + 70_000 + 37
    rnd = os.urandom
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, rnd(64 << 10), 0)  # a boot area
        os.pwrite(fd, rnd(10_000), MIB + 4096)  # not granule-aligned in length
        os.pwrite(fd, bytes(256 << 10), 2 * MIB)  # written zeros: data, not a hole
        os.pwrite(fd, rnd(1536 << 10), 4 * MIB - (512 << 10))  # crosses the 4 MiB boundary
        for i in range(24):  # scattered single blocks: many small extents
            os.pwrite(fd, rnd(100), 6 * MIB + i * (100 << 10))
        os.pwrite(fd, rnd(200), size - 200)  # the tail, ending mid-sector
    finally:
        os.close(fd)
    return path.read_bytes()


def expected_ranges(image: bytes) -> list[tuple[int, int]]:
    """The [start, end) page ranges a zero-skipping upload must leave, merged: every
    non-zero 4 KiB block (the last one cut at the image's end, rounded up to a page),
    then the footer."""
    vsize = vhd_size(len(image))
    ranges: list[tuple[int, int]] = []
    for off in range(0, len(image), GRANULE):
        block = image[off:off + GRANULE]
        if block.count(0) == len(block):
            continue
        end = min(off + GRANULE, -(-len(image) // PAGE) * PAGE)
        if ranges and ranges[-1][1] == off:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((off, end))
    ranges.append((vsize, vsize + FOOTER_SIZE))
    return ranges


def page_puts(log: list[tuple[int, int]]) -> Hook:
    """A request hook recording the [start, end) of every Put Page sent."""
    def hook(request: Any) -> None:
        http = request.http_request
        if "comp=page" in http.url and http.method == "PUT":
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", http.headers["x-ms-range"])
            assert m is not None
            log.append((int(m[1]), int(m[2]) + 1))
    return hook


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


def covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e in ranges)


async def download(c: ContainerClient, name: str) -> bytes:
    stream = await c.get_blob_client(name).download_blob()
    return bytes(await stream.readall())


def assert_vhd_of(blob: bytes, image: bytes) -> None:
    vsize = vhd_size(len(image))
    assert vsize % MIB == 0 and vsize > len(image)
    assert len(blob) == vsize + FOOTER_SIZE
    assert blob[:len(image)] == image
    assert blob[len(image):vsize].count(0) == vsize - len(image)
    footer = parse_footer(blob[vsize:])
    assert footer.disk_type == 2 and footer.current_size == footer.original_size == vsize


def test_nonzero_extents_skip_holes_and_written_zeros(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    image = make_image(img)
    extents = nonzero_extents(img)
    for off, n in extents:
        assert n <= 4 * MIB and off // (4 * MIB) == (off + n - 1) // (4 * MIB)
        assert image[off:off + n].count(0) < n
    got = bytearray(len(image))
    for off, n in extents:
        got[off:off + n] = image[off:off + n]
    assert bytes(got) == image  # nothing non-zero was left out
    data = sum(n for _, n in extents)
    assert data < len(image) // 2  # and the zeros were left out
    assert not any(off <= 2 * MIB + (64 << 10) < off + n for off, n in extents)
    windows = [e for start in range(0, len(image), 4 * MIB)
               for e in nonzero_extents(img, start, start + 4 * MIB)]
    assert windows == extents  # a scan in windows finds the same extents


async def test_page_blob_equals_the_raw_disk_and_skips_zeros(
        tmp_path: Path, azurite_conn: str, container: tuple[str, ContainerClient]) -> None:
    name, c = container
    img = tmp_path / "disk.raw"
    image = make_image(img)
    # Scanned 4 MiB at a time: the scan and the uploads overlap across windows.
    report = await upload_vhd(c.get_blob_client("vm1/sda.vhd"), img, concurrency=4,
                              scan_window=4 * MIB)
    assert report.vhd_size == vhd_size(len(image)) and report.skipped == 0
    assert report.uploaded == report.extents > 24
    blob = await download(c, "vm1/sda.vhd")
    assert_vhd_of(blob, image)
    # Only the non-zero ranges (and the footer) were written.
    assert await written_ranges(c.get_blob_client("vm1/sda.vhd")) == expected_ranges(image)
    assert report.bytes_uploaded < len(image) // 2

    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        missing_backend("qemu-img", "apt-get install qemu-utils")
        return
    vhd = tmp_path / "downloaded.vhd"
    vhd.write_bytes(blob)
    out = await asyncio.to_thread(_run, qemu_img, "compare", "-f", "vpc", "-F", "raw",
                                  str(vhd), str(img))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "identical" in out.stdout
    info = json.loads((await asyncio.to_thread(_run, qemu_img, "info", "--output=json",
                                               "-f", "vpc", str(vhd))).stdout)
    assert info["virtual-size"] == vhd_size(len(image))

    # A second run over a whole blob writes nothing.
    log: list[tuple[int, int]] = []
    c2 = _open(azurite_conn, name, page_puts(log))
    try:
        again = await upload_vhd(c2.get_blob_client("vm1/sda.vhd"), img)
    finally:
        await c2.close()
    assert (again.uploaded, again.skipped, log) == (0, report.extents, [])


async def test_a_sas_never_reaches_the_report(
        tmp_path: Path, azurite_conn: str, container: tuple[str, ContainerClient]) -> None:
    name, c = container
    sas = generate_container_sas(AZURITE_ACCOUNT, name, account_key=AZURITE_KEY,
                                 permission=ContainerSasPermissions(read=True, write=True,
                                                                    create=True, delete=True,
                                                                    list=True),
                                 expiry=datetime.now(UTC) + timedelta(hours=1))
    img = tmp_path / "disk.raw"
    image = make_image(img)
    url = c.url.split("?")[0]
    async with ContainerClient.from_container_url(url, credential=sas) as with_sas:
        report = await upload_vhd(with_sas.get_blob_client("vm1/sda.vhd"), img)
        assert "sig=" in with_sas.get_blob_client("vm1/sda.vhd").url
    assert report.url == f"{url}/vm1/sda.vhd" and "?" not in report.url
    assert_vhd_of(await download(c, "vm1/sda.vhd"), image)


async def test_an_interrupted_upload_resumes_without_rewriting(
        tmp_path: Path, azurite_conn: str, container: tuple[str, ContainerClient]) -> None:
    name, _ = container
    img = tmp_path / "disk.raw"
    image = make_image(img)
    sent: list[tuple[int, int]] = []
    record = page_puts(sent)

    def fail_after_ten(request: Any) -> None:
        record(request)
        if len(sent) > 10 and "comp=page" in request.http_request.url:
            raise ServiceRequestError("injected: the storage went away")

    broken = _open(azurite_conn, name, fail_after_ten)
    try:
        with pytest.raises(PageBlobError, match="injected: the storage went away") as info:
            await upload_vhd(broken.get_blob_client("vm1/sda.vhd"), img, concurrency=3,
                             retries=2, backoff=quick)
    finally:
        await broken.close()
    assert "vm1/sda.vhd" in str(info.value) and "(3 tries)" in str(info.value)
    _, c = container
    before = await written_ranges(c.get_blob_client("vm1/sda.vhd"))
    assert before, "some pages were written before the failure"
    vsize = vhd_size(len(image))
    assert not covered(before, vsize, vsize + FOOTER_SIZE), "no footer on a partial blob"

    resent: list[tuple[int, int]] = []
    fixed = _open(azurite_conn, name, page_puts(resent))
    try:
        report = await upload_vhd(fixed.get_blob_client("vm1/sda.vhd"), img, concurrency=3)
    finally:
        await fixed.close()
    assert report.skipped > 0 and report.uploaded > 0
    assert report.skipped + report.uploaded == report.extents
    # Nothing that was there was sent again; what was missing was.
    assert not [r for r in resent if covered(before, *r)]
    assert len(resent) == report.uploaded + 1  # and the footer, last
    assert resent[-1] == (vsize, vsize + FOOTER_SIZE)
    assert_vhd_of(await download(c, "vm1/sda.vhd"), image)
    assert await written_ranges(c.get_blob_client("vm1/sda.vhd")) == expected_ranges(image)


async def test_a_transient_failure_of_a_page_is_retried(
        tmp_path: Path, azurite_conn: str, container: tuple[str, ContainerClient]) -> None:
    name, c = container
    img = tmp_path / "disk.raw"
    image = make_image(img)
    sent: list[tuple[int, int]] = []
    record = page_puts(sent)

    def fail_the_fifth_once(request: Any) -> None:
        record(request)
        if len(sent) == 5:
            raise ServiceRequestError("injected: connection reset")

    flaky = _open(azurite_conn, name, fail_the_fifth_once)
    try:
        report = await upload_vhd(flaky.get_blob_client("vm1/sda.vhd"), img, concurrency=1,
                                  backoff=quick)
    finally:
        await flaky.close()
    assert sent[4] == sent[5]  # the failed page, sent again
    assert len(sent) == report.uploaded + 2  # every extent, the retry, the footer
    assert_vhd_of(await download(c, "vm1/sda.vhd"), image)


async def test_a_cancelled_upload_resumes_without_rewriting(
        tmp_path: Path, azurite_conn: str, container: tuple[str, ContainerClient]) -> None:
    name, c = container
    img = tmp_path / "disk.raw"
    image = make_image(img)
    sent: list[tuple[int, int]] = []
    record = page_puts(sent)
    midway = asyncio.Event()

    def hook(request: Any) -> None:
        record(request)
        if len(sent) >= 8:
            midway.set()

    first = _open(azurite_conn, name, hook)
    try:
        task = asyncio.create_task(upload_vhd(first.get_blob_client("vm1/sda.vhd"), img,
                                              concurrency=3))
        await midway.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await first.close()
    before = await written_ranges(c.get_blob_client("vm1/sda.vhd"))
    vsize = vhd_size(len(image))
    assert before and not covered(before, vsize, vsize + FOOTER_SIZE)

    resent: list[tuple[int, int]] = []
    second = _open(azurite_conn, name, page_puts(resent))
    try:
        report = await upload_vhd(second.get_blob_client("vm1/sda.vhd"), img)
    finally:
        await second.close()
    assert report.skipped > 0 and report.uploaded > 0
    assert not [r for r in resent if covered(before, *r)]
    assert_vhd_of(await download(c, "vm1/sda.vhd"), image)


async def test_a_blob_of_another_image_is_made_anew(
        tmp_path: Path, container: tuple[str, ContainerClient]) -> None:
    _, c = container
    img = tmp_path / "disk.raw"
    make_image(img)
    await upload_vhd(c.get_blob_client("vm1/sda.vhd"), img)
    img.unlink()
    image = make_image(img)  # another image, same name and size
    fd = os.open(img, os.O_RDWR)
    os.pwrite(fd, bytes(64 << 10), 0)  # zeros where the old blob has data
    os.close(fd)
    image = img.read_bytes()
    report = await upload_vhd(c.get_blob_client("vm1/sda.vhd"), img)
    assert report.skipped == 0
    assert_vhd_of(await download(c, "vm1/sda.vhd"), image)


def _settings(**kw: Any) -> AzureSettings:
    base: dict[str, Any] = {"location": "westeurope", "resource_group": "dr",
                            "storage_account_id": ACCOUNT_ID, "network": "prod-vnet/apps",
                            "drill_network": "drill-vnet/isolated", "vm_size": "Standard_B2s",
                            "concurrency": 4}
    return AzureSettings(**{**base, **kw})


def bios_bootable(path: Path, code: bytes | None = None) -> None:
    """Give a raw image an MBR (sfdisk) with one partition and boot code in front of the
    table: what a BIOS runs. ``code`` stands in for a boot loader's (the target reads only
    whether there is any); None: random bytes."""
    bootimages.need_tools()
    out = subprocess.run(["sfdisk", "-q", str(path)], capture_output=True, text=True,
                         input="label: dos\nstart=2048, type=83, bootable\n")
    assert out.returncode == 0, out.stderr
    with open(path, "r+b") as f:
        f.write(code or os.urandom(440))


def _disks(tmp_path: Path) -> list[RecoveryDisk]:
    os_img = tmp_path / "sda.raw"
    image = make_image(os_img)
    bios_bootable(os_img)
    data_img = tmp_path / "sdb.raw"
    with open(data_img, "wb") as f:  # a data disk of about the smallest size Azure takes
        f.truncate(GIB + 3 * MIB + 512)
        f.write(b"data disk label")
    return [RecoveryDisk("sda", os_img, len(image)),
            RecoveryDisk("sdb", data_img, data_img.stat().st_size)]


async def test_create_writes_vhds_and_a_template_the_sdk_models_read_back(
        tmp_path: Path, container: tuple[str, ContainerClient]) -> None:
    name, c = container
    target = AzureTarget(c, _settings(), prefix="dr/")
    disks = _disks(tmp_path)
    spec = RecoverySpec(machine="web1", vm_name="web1-test", drill=True, ip="10.20.0.7")
    assert await target.check(spec, disks) == []
    rec = await target.create(spec, disks)
    assert sorted(rec.resources) == [f"blob:{name}/dr/web1-test/sda.vhd",
                                     f"blob:{name}/dr/web1-test/sdb.vhd",
                                     f"blob:{name}/dr/web1-test/template.json"]
    assert sorted(target.planned(spec, disks).resources) == sorted(rec.resources)
    assert "not configured" in rec.details["deployment"]
    assert rec.details["firmware"].startswith("bios: the item's firmware setting, and the "
                                              "disk boots with it (boot code in the MBR")
    assert await target.boot(rec, 1.0) is None
    assert_vhd_of(await download(c, "dr/web1-test/sda.vhd"), disks[0].path.read_bytes())

    text = (await download(c, "dr/web1-test/template.json")).decode()
    t = json.loads(text)
    assert text == template_json(t)  # stable: sorted keys, fixed indentation
    assert template_problems(t) == []
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in t["resources"]:
        by_type.setdefault(r["type"], []).append(r)
        # Each body round-trips through the SDK model's deserializer and serializer.
        body = {k: v for k, v in r.items() if k not in ("type", "apiVersion", "name",
                                                        "dependsOn")}
        assert MODELS[r["type"]](body).as_dict(exclude_readonly=True) == body
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}(-preview)?", r["apiVersion"])
        assert r["apiVersion"] == api_versions()[r["type"]]
        assert r["location"] == "westeurope"
    disks_by_name = {r["name"]: r for r in by_type[DISK]}
    assert set(disks_by_name) == {"web1-test-sda", "web1-test-sdb"}
    for d in ("sda", "sdb"):
        cd = disks_by_name[f"web1-test-{d}"]["properties"]["creationData"]
        url = c.get_blob_client(f"dr/web1-test/{d}.vhd").url
        assert cd == {"createOption": "Import", "sourceUri": url, "storageAccountId": ACCOUNT_ID}
    os_disk = disks_by_name["web1-test-sda"]["properties"]
    assert (os_disk["osType"], os_disk["hyperVGeneration"]) == ("Linux", "V1")
    (nic,) = by_type[NIC]
    ipc = nic["properties"]["ipConfigurations"][0]["properties"]
    assert ipc["privateIPAllocationMethod"] == "Static" and ipc["privateIPAddress"] == "10.20.0.7"
    # A drill goes to the drill network.
    assert ipc["subnet"]["id"] == ("[resourceId('Microsoft.Network/virtualNetworks/subnets', "
                                   "'drill-vnet', 'isolated')]")
    (vm,) = by_type[VM]
    p = vm["properties"]
    assert vm["name"] == "web1-test" and p["hardwareProfile"]["vmSize"] == "Standard_B2s"
    assert p["diagnosticsProfile"] == {"bootDiagnostics": {"enabled": True}}
    assert p["storageProfile"]["osDisk"]["managedDisk"]["id"].endswith("'web1-test-sda')]")
    (data,) = p["storageProfile"]["dataDisks"]
    assert data["lun"] == 0 and data["managedDisk"]["id"].endswith("'web1-test-sdb')]")
    assert p["networkProfile"]["networkInterfaces"][0]["id"].endswith("'web1-test-nic')]")
    assert len(vm["dependsOn"]) == 3

    # The same recovery again builds the same bytes, and resumes (nothing to upload).
    rec2 = await target.create(spec, disks)
    assert "0 extents written" in rec2.details["disk:sda"]
    assert (await download(c, "dr/web1-test/template.json")).decode() == text


def test_the_template_check_can_fail() -> None:
    t: dict[str, Any] = {"resources": [
        {"type": DISK, "apiVersion": "2024-03-02", "name": "d", "location": "x",
         "properties": {"creationData": {"createOption": "Import", "sourceURI": "u"}}},
        {"type": VM, "name": "v", "location": "x", "etag": "e",
         "properties": {"hardwareProfile": {"vmSize": "Standard_B2s", "size": 1}}},
        {"type": "Microsoft.Compute/virtualMachinez", "apiVersion": "1", "name": "z"}]}
    problems = template_problems(t)
    assert any("creationData.sourceURI: not a property of CreationData" in p for p in problems)
    assert any("resources[1].apiVersion: missing" in p for p in problems)
    assert any("resources[1].etag: read-only" in p for p in problems)
    assert any("hardwareProfile.size: not a property of HardwareProfile" in p for p in problems)
    assert any("resources[2].type: unknown resource type" in p for p in problems)


def _refused(spec: RecoverySpec, disks: list[RecoveryDisk], *, vm_size: str | None = "Standard_B2s",
             network: str | None = "v/s") -> dict[str, str]:
    out: dict[str, str] = {}
    for r in check_vm(spec, disks, vm_size=vm_size, network=network):
        out[r.setting] = f"{out[r.setting]} | {r.message}" if r.setting in out else r.message
    return out


def test_check_refuses_each_bad_setting_naming_it_and_what_is_allowed() -> None:
    d = Path("/nonexistent")
    ok = RecoverySpec(machine="m", vm_name="web-1")
    os_disk = RecoveryDisk("sda", d, 30 * GIB + 5)  # not whole MiB: padded, allowed
    assert _refused(ok, [os_disk]) == {}

    for bad in ("a" * 64, "web_1", "web-", "-web", "web.1", ""):
        msg = _refused(RecoverySpec(machine="m", vm_name=bad), [os_disk])["vm_name"]
        assert repr(bad) in msg and "1 to 63 letters, digits and hyphens" in msg
    assert _refused(RecoverySpec(machine="m", vm_name="a" * 63), [os_disk]) == {}

    got = _refused(RecoverySpec(machine="m", vm_name="w", firmware="coreboot"), [os_disk])
    assert "bios (Generation 1) or uefi (Generation 2)" in got["firmware"]

    big = RecoveryDisk("sda", d, 2049 * GIB)
    got = _refused(ok, [big])
    assert "at most 2048 GiB" in got["disk:sda"] and "Generation 1" in got["disk:sda"]
    uefi = RecoverySpec(machine="m", vm_name="w", firmware="uefi")
    assert _refused(uefi, [big]) == {}  # Generation 2 takes up to 4095 GiB
    assert "at most 4095 GiB" in _refused(uefi, [RecoveryDisk("sda", d, 4096 * GIB)])["disk:sda"]

    small = RecoveryDisk("sdb", d, 512 * MIB)
    assert "1 to 32767 GiB" in _refused(ok, [os_disk, small])["disk:sdb"]
    huge = RecoveryDisk("sdc", d, 32768 * GIB)
    assert "1 to 32767 GiB" in _refused(ok, [os_disk, huge])["disk:sdc"]

    five = [os_disk] + [RecoveryDisk(f"d{i}", d, GIB) for i in range(5)]
    assert "at most 4" in _refused(ok, five)["disks"]  # Standard_B2s takes 4 data disks
    many = [os_disk] + [RecoveryDisk(f"d{i}", d, GIB) for i in range(65)]
    assert "at most 64" in _refused(ok, many, vm_size="Standard_D8s_v3")["disks"]
    assert "exactly one OS disk" in _refused(ok, [])["disks"]

    msg = _refused(ok, [os_disk], vm_size="Standard_Huge")["vm_size"]
    assert "'Standard_Huge'" in msg and "Standard_B2s" in msg
    msg = _refused(uefi, [os_disk], vm_size="Standard_A1_v2")["vm_size"]
    assert "Generation 1" in msg and "Standard_B2s" in msg
    got = _refused(RecoverySpec(machine="m", vm_name="w", cpus=64), [os_disk], vm_size=None)
    assert "64 CPUs" in got["azure_size"] and "Standard_D8s_v3" in got["azure_size"]
    assert _refused(RecoverySpec(machine="m", vm_name="w", cpus=2, memory_mib=6000),
                    [os_disk], vm_size=None) == {}

    assert "VNET/SUBNET" in _refused(ok, [os_disk], network=None)["network"]
    assert "VNET/SUBNET" in _refused(ok, [os_disk], network="just-a-vnet")["network"]
    assert _refused(ok, [os_disk], network="/subscriptions/s/resourceGroups/r/providers/"
                    "Microsoft.Network/virtualNetworks/v/subnets/s") == {}
    for ip in ("8.8.8.8", "10.0.0.300", "fd00::1"):
        msg = _refused(RecoverySpec(machine="m", vm_name="w", ip=ip), [os_disk])["ip"]
        assert repr(ip) in msg and "private IPv4" in msg


async def test_create_refuses_what_check_refuses(
        tmp_path: Path, container: tuple[str, ContainerClient]) -> None:
    _, c = container
    target = AzureTarget(c, _settings(network=None, drill_network=None))
    with pytest.raises(TargetError) as info:
        await target.create(RecoverySpec(machine="m", vm_name="web_1"), _disks(tmp_path))
    assert info.value.code == "azure_refused"
    assert "vm_name" in info.value.message and "network" in info.value.message
    assert [b async for b in c.list_blobs()] == []


async def test_cleanup_removes_the_blobs_and_submit_needs_credentials(
        tmp_path: Path, azurite_conn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "t" + uuid.uuid4().hex[:20]  # not there yet: create makes it
    conn = tmp_path / "conn"
    conn.write_text(azurite_conn)
    monkeypatch.delenv("SITERECOVERY_AZURE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    target = AzureTarget.open(f"azure://{name}/dr?connection_string_file={conn}", _settings())
    c = _open(azurite_conn, name)
    try:
        rec = await target.create(RecoverySpec(machine="m", vm_name="web1"), _disks(tmp_path))
        listed = [b.name async for b in c.list_blobs()]
        assert sorted(listed) == ["dr/web1/sda.vhd", "dr/web1/sdb.vhd", "dr/web1/template.json"]

        with pytest.raises(TargetError) as info:
            await target.submit(rec)
        assert info.value.code == "azure_credentials_missing"
        assert "credentials not configured" in info.value.message

        await target.cleanup(rec)
        assert [b async for b in c.list_blobs()] == []
        await target.cleanup(rec)  # idempotent

        # Deployed resources cannot go without credentials: the blobs go, the rest is named.
        rec = await target.create(RecoverySpec(machine="m", vm_name="web1"), _disks(tmp_path))
        deployed = Recovered("azure", "web1", [*rec.resources, "azure-vm:web1"], rec.details)
        with pytest.raises(TargetError) as info:
            await target.cleanup(deployed)
        assert info.value.code == "azure_credentials_missing"
        assert "azure-vm:web1" in info.value.message
        assert [b async for b in c.list_blobs()] == []
    finally:
        await target.close()
        await c.close()

    with pytest.raises(TargetError) as info:
        AzureTarget.open(f"azure://{name}", _settings())
    assert info.value.code == "azure_storage_unusable"
    assert "no Azure credentials" in info.value.message


def test_settings_from_a_config_table() -> None:
    s = AzureSettings.from_mapping({
        "location": "westeurope", "resource_group": "dr", "storage_account_id": ACCOUNT_ID,
        "network": "prod/apps", "drill_network": "drill/iso", "concurrency": 16,
        "arm": {"subscription_id": "s", "tenant_id": "t", "client_id": "c",
                "client_secret_file": "/etc/siterecovery/azure-secret"}})
    assert (s.network, s.drill_network, s.concurrency, s.vm_size) == ("prod/apps", "drill/iso",
                                                                       16, None)
    assert s.arm is not None and s.arm.client_secret_file == Path("/etc/siterecovery/azure-secret")
    assert "secret=***" in repr(s.arm)
    base = {"location": "l", "resource_group": "r", "storage_account_id": "a"}
    for bad, key in (({**base, "regoin": "x"}, "regoin"), ({"location": "l"}, "resource_group"),
                     ({**base, "concurrency": 0}, "concurrency"),
                     ({**base, "arm": {"tenant_id": "t"}}, "arm"),
                     ({**base, "tags": {"a": 1}}, "tags")):
        with pytest.raises(ValueError, match=key):
            AzureSettings.from_mapping(bad)


async def test_a_failed_create_names_what_it_made_for_cleanup(
        tmp_path: Path, azurite_conn: str, container: tuple[str, ContainerClient]) -> None:
    name, c = container
    puts: list[tuple[int, int]] = []
    record = page_puts(puts)

    def outage_after_five(request: Any) -> None:
        record(request)
        if len(puts) > 5 and "comp=page" in request.http_request.url:
            raise ServiceRequestError("injected: the storage went away")

    broken = _open(azurite_conn, name, outage_after_five)
    try:
        target = AzureTarget(broken, _settings(concurrency=2), backoff=quick)
        with pytest.raises(TargetError) as info:
            await target.create(RecoverySpec(machine="m", vm_name="web1"), _disks(tmp_path))
    finally:
        await broken.close()
    err = info.value
    assert err.code == "azure_upload_failed" and "resume" in err.hint
    assert err.recovered is not None
    assert err.recovered.resources == [f"blob:{name}/web1/sda.vhd"]
    assert [b.name async for b in c.list_blobs()] == ["web1/sda.vhd"]
    await AzureTarget(c, _settings()).cleanup(err.recovered)
    assert [b async for b in c.list_blobs()] == []


async def test_the_generation_follows_the_restored_disk(
        tmp_path: Path, container: tuple[str, ContainerClient]) -> None:
    bootimages.need_tools()
    _, c = container
    target = AzureTarget(c, _settings(vm_size=None))
    spec = RecoverySpec(machine="m", vm_name="web2")  # firmware: bios, the default
    uefi = bootimages.gpt(tmp_path / "uefi.img", bios_boot=False, esp=True)
    disk = RecoveryDisk("sda", uefi, uefi.stat().st_size)

    # Before the restore (the select step) the disk is judged by the settings alone.
    later = RecoveryDisk("sda", tmp_path / "not-yet.img", disk.size)
    assert await target.check(replace(spec, azure_size="Standard_A1_v2"), [later]) == []
    # Restored, it boots UEFI only: a Generation 1 size is refused, naming the setting.
    (refusal,) = await target.check(replace(spec, azure_size="Standard_A1_v2"), [disk])
    assert refusal.setting == "azure_size"
    assert "Generation 1 (BIOS) machines only" in refusal.message
    assert "Standard_B1s" in refusal.message

    rec = await target.create(spec, [disk])
    assert rec.details["firmware"].startswith("uefi: the disk boots with uefi only")
    assert "the item's firmware setting bios would not boot it" in rec.details["firmware"]
    t = json.loads(await download(c, "web2/template.json"))
    assert template_problems(t) == []
    (os_disk,) = [r for r in t["resources"] if r["type"] == DISK]
    assert os_disk["properties"]["hyperVGeneration"] == "V2"
    (vm,) = [r for r in t["resources"] if r["type"] == VM]
    assert vm["properties"]["hardwareProfile"]["vmSize"] == rec.details["vm_size"]
    assert rec.details["vm_size"] == "Standard_B1s"  # the smallest Generation 2 size

    # A disk that boots neither way is refused before anything is uploaded.
    blobs = sorted([b.name async for b in c.list_blobs()])
    dead = bootimages.mbr(tmp_path / "dead.img", boot_code=False)
    with pytest.raises(TargetError) as info:
        await target.create(replace(spec, vm_name="web3"),
                            [RecoveryDisk("sda", dead, dead.stat().st_size)])
    assert info.value.code == "azure_refused"
    assert "OS disk sda boots neither with BIOS nor with UEFI" in info.value.message
    assert "no boot code in the MBR" in info.value.message
    assert sorted([b.name async for b in c.list_blobs()]) == blobs
    # A first sector that is no partition table is refused with the parser's reason.
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(2 * MIB))
    (refusal,) = await target.check(spec, [RecoveryDisk("sda", junk, 2 * MIB)])
    assert refusal.setting == "disks" and "no MBR signature" in refusal.message


def test_the_item_azure_size_reaches_the_check_and_wins_over_the_target_vm_size() -> None:
    item = apply(RecoverySettings(), {"target": "azure", "azure_size": "Standard_D4s_v5"}, [])
    spec = item.spec("m", "p1", drill=False)
    assert spec.azure_size == "Standard_D4s_v5"
    os_disk = RecoveryDisk("sda", Path("/nonexistent"), 30 * GIB)
    six = [os_disk] + [RecoveryDisk(f"d{i}", Path("/nonexistent"), GIB) for i in range(6)]
    # Standard_B2s (the target's) takes 4 data disks; the item's Standard_D4s_v5 takes 8.
    assert "disks" in _refused(replace(spec, azure_size=None), six)
    assert _refused(spec, six) == {}
    nine = six + [RecoveryDisk(f"e{i}", Path("/nonexistent"), GIB) for i in range(3)]
    msg = _refused(spec, nine)["disks"]
    assert "azure_size Standard_D4s_v5 takes at most 8" in msg and "Standard_D8s_v3" in msg
    msg = _refused(replace(spec, azure_size="Standard_Nope"), [os_disk])["azure_size"]
    assert "'Standard_Nope' is not offered" in msg and "Standard_D4s_v5" in msg


def test_boot_diagnostics_go_to_managed_storage_or_the_given_account() -> None:
    plan = VmPlan(vm_name="v", location="westeurope", vm_size="Standard_B2s",
                  generation="V1", storage_account_id=ACCOUNT_ID, subnet_id="[x]", ip=None,
                  os_disk=DiskPlan("v-sda", "https://a.blob.core.windows.net/c/v/sda.vhd"))
    for uri, expected in ((None, {"enabled": True}),
                          ("https://diag.blob.core.windows.net/",
                           {"enabled": True, "storageUri": "https://diag.blob.core.windows.net/"})):
        t = build_template(replace(plan, boot_diagnostics_uri=uri))
        (vm,) = [r for r in t["resources"] if r["type"] == VM]
        assert vm["properties"]["diagnosticsProfile"] == {"bootDiagnostics": expected}
        assert template_problems(t) == []
    base = {"location": "l", "resource_group": "r", "storage_account_id": "a"}
    s = AzureSettings.from_mapping({**base, "boot_diagnostics_storage_uri":
                                    "https://diag.blob.core.windows.net/"})
    assert s.boot_diagnostics_storage_uri == "https://diag.blob.core.windows.net/"
    for bad in ("http://diag.blob.core.windows.net/", "https://d.blob.core.windows.net/?sig=x"):
        with pytest.raises(ValueError, match="boot_diagnostics_storage_uri"):
            AzureSettings.from_mapping({**base, "boot_diagnostics_storage_uri": bad})


async def test_an_item_network_names_a_subnet_of_the_target_vnet(
        container: tuple[str, ContainerClient]) -> None:
    _, c = container
    target = AzureTarget(c, _settings())  # prod-vnet/apps, drill-vnet/isolated
    spec = RecoverySpec(machine="m", vm_name="w")
    assert target.network_for(spec) == "prod-vnet/apps"
    assert target.network_for(replace(spec, drill=True)) == "drill-vnet/isolated"
    # The item's settings hold plain names: a subnet of the VNet the target uses.
    assert target.network_for(replace(spec, network="db")) == "prod-vnet/db"
    assert target.network_for(replace(spec, network="iso2", drill=True)) == "drill-vnet/iso2"
    assert target.network_for(replace(spec, network="other/sub")) == "other/sub"
    rid = ("/subscriptions/s/resourceGroups/r/providers/Microsoft.Network/virtualNetworks/v/"
           "subnets/apps")
    by_id = AzureTarget(c, _settings(network=rid))
    assert by_id.network_for(replace(spec, network="db")) == rid.replace("/apps", "/db")
    # With no target network there is no VNet to name a subnet of: refused, saying so.
    bare = AzureTarget(c, _settings(network=None))
    disk = RecoveryDisk("sda", Path("/nonexistent"), GIB)
    (refusal,) = await bare.check(replace(spec, network="db"), [disk])
    assert refusal.setting == "network" and "VNET/SUBNET" in refusal.message
