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
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio

from configserver.server import ConfigServer
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests.backends import missing_backend
from tests.helpers import sha256
from tests.installsite import install_servers, new_point, restored
from tests.sitehelpers import step, wait_job
from tests.sshd import agent_bundle
from tests.vmtarget import HOST_ALIAS, VmTarget, missing

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT_PW = "vm-root-secret-5"
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
    disk.write_bytes(os_random(DISK_BYTES))
    async with (VmTarget(tmp / "vm", disk, passwords={"root": ROOT_PW}) as vm,
                install_servers(tmp, bundle.path, ROOT_PW, site_host="127.0.0.1",
                                agent_host=HOST_ALIAS, ps_host="127.0.0.1",
                                advertise=True) as (cs, ps, api)):
        await api.post("/api/v1/machines", {
            "name": "vm01", "ip": "127.0.0.1", "ssh_port": vm.ssh_port, "os_type": "linux",
            "os_name": "debian", "os_version": "12", "account": "rootpw",
            "process_server": "ps1", "disks": [{"name": "vdb", "path": "/dev/vdb"}]})
        yield Site(cs, ps, api, vm, disk)


def os_random(n: int) -> bytes:
    with open("/dev/urandom", "rb") as f:
        return f.read(n)


async def _ssh(s: Site, command: str) -> str:
    async with asyncssh.connect("127.0.0.1", port=s.vm.ssh_port, username="root",
                                password=ROOT_PW, known_hosts=None, config=None,
                                agent_path=None) as conn:
        return str((await conn.run(command, check=True)).stdout)


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
