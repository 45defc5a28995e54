"""Push install end to end into a real VM (issue #14): a small Debian 12 machine booted
under QEMU (tests/vmtarget.py: its own kernel, root disk, systemd and sshd; the boot
proved on its serial console) is push-installed by the process server over SSH, the
systemd unit it gets is enabled and started, the agent replicates the machine's own disk
from inside the VM to the process server, and the points restore byte-exact against the
disk's image file on the host.

The VM's network is QEMU's user-mode stack, so no packet goes to a VM address: the
process server logs in to the guest's sshd forwarded on the host's loopback (the machine
is ``127.0.0.1`` with its ``ssh_port`` in the inventory), and the agent reaches both
servers at 10.0.2.2, the host's loopback as the guest sees it (the process server's
``advertise_address``, the install's ``site_url``, names in both servers'
certificates).

Then the disaster: the VM is lost, vm01 fails over onto the folder target, and a second
VM boots from the recovered disk with its own SMBIOS UUID and the original's agent (its
program, configuration, certificate and state, as a recovered root disk holds them). Its
agent reads its host id from the firmware, is told apart from the original by the
configuration server and left idle, and once re-protected through it (``agent: true``)
sends a delta on the failover point of only the blocks written since, restoring
byte-exact against the recovered disk.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import pytest_asyncio

from configserver.server import ConfigServer
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests.backends import missing_backend
from tests.helpers import open_vault, restore_all, sha256
from tests.installsite import install_servers, new_point, restored
from tests.sitehelpers import step, until_changed, wait_job
from tests.sshd import agent_bundle
from tests.vmtarget import HOST_ALIAS, VmTarget, missing
from vault.regkey import make_key

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT_PW = "vm-root-secret-5"
ORIGINAL = "3a7c1e52-0b9d-4f16-8e27-5d4c3b2a1f00"  # the VMs' SMBIOS UUIDs
RECOVERED = "9e8d7c6b-5a49-4382-a1b0-c9d8e7f6a5b4"
AGENT_FILES = ("opt/siterecovery-agent", "etc/siterecovery", "var/lib/siterecovery-mobility",
               "etc/systemd/system/siterecovery-agent.service")
DISK_BYTES = 8 << 20
UNIT = "siterecovery-agent.service"


@dataclass
class Site:
    cs: ConfigServer
    ps: ProcServer
    api: ApiClient
    vm: VmTarget
    disk: Path  # the VM's /dev/vdb, as an image file on the host


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    if why := missing():
        missing_backend("a VM under QEMU", why)
    tmp = tmp_path_factory.mktemp("installvm")
    bundle = agent_bundle(tmp_path_factory)
    disk = tmp / "vdb.img"
    await asyncio.to_thread(_data_disk, disk)
    async with (VmTarget(tmp / "vm", disk, passwords={"root": ROOT_PW}, uuid=ORIGINAL) as vm,
                install_servers(tmp, bundle.path, ROOT_PW, site_host="127.0.0.1",
                                agent_host=HOST_ALIAS, ps_host="127.0.0.1",
                                advertise=True) as (cs, ps, api)):
        await api.post("/api/v1/machines", {
            "name": "vm01", "ip": "127.0.0.1", "ssh_port": vm.ssh_port, "os_type": "linux",
            "os_name": "debian", "os_version": "12", "account": "rootpw",
            "process_server": "ps1", "disks": [{"name": "vdb", "path": "/dev/vdb"}]})
        yield Site(cs, ps, api, vm, disk)


def _data_disk(path: Path) -> None:
    """Random data under an ext4's metadata: a failover's disk check wants a filesystem."""
    path.write_bytes(os_random(DISK_BYTES))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)


def _differing(a: bytes, b: bytes, bs: int) -> int:
    return sum(a[o:o + bs] != b[o:o + bs] for o in range(0, len(a), bs))


def os_random(n: int) -> bytes:
    with open("/dev/urandom", "rb") as f:
        return f.read(n)


async def _ssh(s: Site, command: str, *, vm: VmTarget | None = None) -> str:
    return (await _ssh_bytes(vm or s.vm, command)).decode()


async def _ssh_bytes(vm: VmTarget, command: str, stdin: bytes | None = None) -> bytes:
    async with asyncssh.connect("127.0.0.1", port=vm.ssh_port, username="root",
                                password=ROOT_PW, known_hosts=None, config=None,
                                agent_path=None) as conn:
        out = (await conn.run(command, check=True, input=stdin, encoding=None)).stdout
        assert isinstance(out, bytes)
        return out


async def _new_point(s: Site, old: str | None) -> str:
    """vm01's latest point once it is protected and its point is not ``old``."""
    return await new_point(s.cs, s.api, "vm01", old, 240,
                           lambda: _ssh(s, f"journalctl -u {UNIT} -n 30 --no-pager"))


async def _restores_to_the_disk(s: Site, point_id: str, out: Path) -> None:
    # the VM's disk, as its image file holds it
    assert await restored(s.ps, point_id, out) == {"vdb": sha256(s.disk)}


async def test_push_install_into_a_vm_replicates_its_own_disk(site: Site,
                                                              tmp_path: Path) -> None:
    assert "Server listening on 0.0.0.0 port 22" in site.vm.console()  # it booted
    job = (await site.api.post("/api/v1/machines/vm01/install", {
        "site_url": f"https://{HOST_ALIAS}:{site.cs.site_port}",
        "heartbeat_timeout_seconds": 240}))["job"]
    job = await wait_job(site.api, job["id"], timeout=300)
    assert job["state"] == "succeeded", job
    fp = asyncssh.import_public_key(site.vm.host_key).get_fingerprint("sha256")
    prereq = step(job, "prerequisites")["message"]
    assert f"host key {fp} recorded" in prereq
    assert "hosts: vmtarget mapped" in prereq  # the guest's own /etc/hosts
    assert (await _ssh(site, "uname -r")).strip() in prereq  # its kernel, not the host's
    assert step(job, "start")["message"] == f"systemd unit {UNIT} enabled and started"
    assert "checked in" in step(job, "first_heartbeat")["message"]
    assert (await _ssh(site, f"systemctl is-enabled {UNIT}; systemctl is-active {UNIT}")
            ).split() == ["enabled", "active"]

    await site.api.post("/api/v1/replication/enable", {"machine": "vm01"})
    await _ssh(site, f"systemctl restart {UNIT}")  # its settings, then the initial copy
    point = await _new_point(site, None)
    await _restores_to_the_disk(site, point, tmp_path / "first")

    # written inside the VM (synced: the disk's file has it) while the agent is stopped:
    # the cycle after its start holds it
    await _ssh(site, f"systemctl stop {UNIT} && dd if=/dev/urandom of=/dev/vdb bs=64K "
                     f"count=2 seek=7 conv=notrunc,fsync status=none && systemctl start {UNIT}")
    await _restores_to_the_disk(site, await _new_point(site, point), tmp_path / "next")


async def test_reprotect_through_the_agent_in_the_recovered_vm(site: Site,
                                                               tmp_path: Path) -> None:
    api = site.api
    assert (await api.get("/api/v1/machines/vm01"))["host_id"] == ORIGINAL  # the firmware's
    bs = (await api.get("/api/v1/policies/default"))["block_size"]
    # The disaster: the machine is lost with its agent's files as its root disk holds
    # them (stopped first: the last point is the one the failover takes).
    await _ssh(site, f"systemctl stop {UNIT}")
    files = await _ssh_bytes(site.vm, "cd / && tar -czf - " + " ".join(AGENT_FILES))
    await site.vm.__aexit__()
    vault_dir = Path(site.ps.cfg.vault_url.removeprefix("file://"))
    key = Path(site.ps.cfg.vault_key_file)
    vault = await open_vault(vault_dir, key)
    try:  # the configuration server reads the vault to recover
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, site.ps.cfg.vault_url, time.time())),
            "vault_key_file": str(key)})
    finally:
        await vault.close()
    done = await wait_job(api, (await api.post("/api/v1/items/vm01/failover",
                                               {"point": "latest"}))["job"]["id"], timeout=120)
    assert done["state"] == "succeeded", done
    recovered = Path(site.cs.cfg.data_dir) / "recovered" / "vm01" / "vdb.img"
    at_failover = recovered.read_bytes()
    failover_point = (await api.get("/api/v1/items/vm01"))["failover"]["point"]

    async with VmTarget(tmp_path / "vm2", recovered, passwords={"root": ROOT_PW},
                        uuid=RECOVERED) as vm2:
        await _ssh_bytes(vm2, "cd / && tar -xzf -", files)
        await _ssh(site, f"systemctl daemon-reload && systemctl start {UNIT}", vm=vm2)

        async def checked_in() -> dict[str, Any] | None:
            item = await api.get("/api/v1/items/vm01")
            seen = item["failover"].get("recovered_agent") or {}
            return seen if seen.get("host_id") else None
        seen = await until_changed(site.cs, checked_in, timeout=240)
        assert seen["host_id"] == RECOVERED  # told apart: its own firmware's UUID
        assert (await api.get("/api/v1/machines/vm01"))["host_id"] == ORIGINAL
        assert (await api.get("/api/v1/items/vm01"))["failover"].get("reprotect") is None

        # Business goes on in the recovered VM; then re-protect through its agent.
        await _ssh(site, "dd if=/dev/urandom of=/dev/vdb bs=64K count=3 seek=5 "
                         "conv=notrunc,fsync status=none", vm=vm2)
        written = recovered.read_bytes()
        first = _differing(at_failover, written, bs)
        assert first >= 1
        job = (await api.post("/api/v1/items/vm01/reprotect", {"agent": True}))["job"]
        done = await wait_job(api, job["id"], timeout=300)
        assert done["state"] == "succeeded", (done, await _ssh(
            site, f"journalctl -u {UNIT} -n 40 --no-pager", vm=vm2))
        item = await api.get("/api/v1/items/vm01")
        rp = item["failover"]["reprotect"]
        assert (item["state"], item["direction"], rp["via"]) == ("reprotected", "reverse",
                                                                 "agent")
        vault = await open_vault(vault_dir, key)
        try:
            point = await vault.read_point(rp["last_point"])
            assert point.base == failover_point  # a delta on the failover point
            delta = await vault.read_map(point.disks[0].map)
            assert len(delta.blocks) == first  # only what was written since the failover
            assert (await restore_all(vault, point, tmp_path / "out"))["vdb"] == \
                sha256(recovered)
        finally:
            await vault.close()
        assert recovered.read_bytes() == written
