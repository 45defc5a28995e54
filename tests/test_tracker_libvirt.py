"""QEMU dirty bitmaps through libvirt, on the real thing: libvirtd, an emulated domain.

A transient domain (``srtrk-…``) with one qcow2 disk runs without an operating system;
the test writes to its disk *inside QEMU* (``qemu-io`` through the monitor, on the
guest's virtio device: QEMU's block layer, where the dirty bitmaps are kept) and applies
the same writes to a reference image. The agent on the host protects the domain with
``snapshot = "libvirt"``: each cycle a pull-mode backup with a new checkpoint, read over
NBD. Every point is restored from the vault and compared byte for byte with the
reference; a cycle reads only the blocks written since the last one (nothing for an
unchanged disk); a checkpoint deleted behind the agent's back costs one counted full
read, never a wrong point; a restarted agent goes on from the checkpoints, and a
verification scan reads the disk whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobility.agent import Agent, CycleResult
from mobility.daemon import providers
from mobility.libvirtbackup import LibvirtBackup
from procserver.server import ProcServer
from tests.backends import missing_backend, traversable
from tests.helpers import Pki, agent_config, point_restores_to
from tests.libvirtd import libvirtd_running

pytestmark = pytest.mark.root
DISK = 64 << 20
BS = 64 << 10


def virsh(uri: str, *args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", uri, *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="module")
def uri() -> Iterator[str]:
    for tool in ("qemu-img", "virsh"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs qemu-utils and libvirt-clients")
    with libvirtd_running() as u:
        yield u


class Guest:
    """The domain and a reference copy of what its disk holds."""

    def __init__(self, uri: str, name: str, image: Path, reference: Path) -> None:
        self.uri, self.name, self.image, self.reference = uri, name, image, reference

    def write(self, byte: int, offset: int, length: int) -> None:
        cmd = f'qemu-io -d virtio-disk0/virtio-backend "write -P {byte:#x} {offset} {length}"'
        out = virsh(self.uri, "qemu-monitor-command", "--hmp", self.name, cmd)
        assert "error" not in out.lower(), out
        with open(self.reference, "r+b") as f:
            f.seek(offset)
            f.write(bytes([byte]) * length)

    def owner(self) -> tuple[int, int]:
        """The uid and gid QEMU runs as (the domain's DAC label)."""
        label = re.search(r"<label>\+(\d+):\+(\d+)</label>", virsh(self.uri, "dumpxml", self.name))
        assert label is not None
        return int(label.group(1)), int(label.group(2))

    def sha(self) -> str:
        return hashlib.sha256(self.reference.read_bytes()).hexdigest()


@contextlib.contextmanager
def running_guest(uri: str, tmp: Path, fmt: str = "qcow2") -> Iterator[Guest]:
    """A transient domain with one empty disk (a ``fmt`` image), its files under
    ``tmp``."""
    folder = tmp / "lv"
    folder.mkdir(parents=True)
    traversable(folder)  # the emulator (libvirt-qemu) must reach the image
    image = folder / f"vda.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), str(DISK)],
                   check=True)
    reference = tmp / "reference.img"
    with open(reference, "wb") as f:
        f.truncate(DISK)
    name = f"srtrk-{uuid.uuid4().hex[:8]}"
    xml = tmp / "domain.xml"
    xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>""")
    virsh(uri, "create", str(xml))  # transient: its checkpoints go with it
    try:
        yield Guest(uri, name, image, reference)
    finally:
        subprocess.run(["virsh", "-q", "-c", uri, "destroy", name], capture_output=True,
                       check=False)


@pytest.fixture
def guest(uri: str, tmp_path: Path) -> Iterator[Guest]:
    with running_guest(uri, tmp_path) as g:
        yield g


async def cycle(agent: Agent, ps: ProcServer, tmp: Path, key: Path, g: Guest
                ) -> CycleResult:
    want = g.sha()
    r = await agent.replicate_once()
    await point_restores_to(ps, tmp, key, r.cycle, {"vda": want})
    return r


async def test_only_blocks_written_inside_qemu_are_read_and_every_point_is_exact(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        guest: Guest) -> None:
    key = vault_at[1]
    cfg = agent_config(tmp_path, pki, "vm01", procserver.port, {"vda": guest.image},
                       snapshot="libvirt", libvirt_uri=guest.uri, libvirt_domain=guest.name,
                       libvirt_socket_dir=str(guest.image.parent / "run"),
                       metrics_file=str(tmp_path / "agent.prom"))
    cfg.validate()
    agent = Agent(cfg)
    backup = agent.provider
    assert isinstance(backup, LibvirtBackup)
    assert isinstance(providers(cfg)[0], LibvirtBackup)  # `mobility run` steered by a site
    try:
        guest.write(0xAB, 0, 1 << 20)
        r = await cycle(agent, procserver, tmp_path, key, guest)
        assert (r.kind, r.consistency, r.fallbacks) == ("full", "crash", {})

        guest.write(0x11, 8 << 20, 64 << 10)
        guest.write(0x22, (33 << 20) + 7000, 200_000)  # not block-aligned: 4 blocks
        r = await cycle(agent, procserver, tmp_path, key, guest)
        assert (r.kind, r.tracking, r.fallbacks) == ("delta", {"vda": "libvirt"}, {})
        assert r.bytes_read == 5 * BS and r.blocks_sent == 5

        r = await cycle(agent, procserver, tmp_path, key, guest)  # nothing written
        assert (r.tracking, r.bytes_read, r.blocks_sent) == ({"vda": "libvirt"}, 0, 0)

        # The checkpoints are deleted behind the agent's back: it cannot vouch for
        # anything, reads the disk whole and says so.
        for cp in virsh(guest.uri, "checkpoint-list", guest.name, "--name").split():
            virsh(guest.uri, "checkpoint-delete", guest.name, cp)
        guest.write(0x33, 60 << 20, 1 << 20)
        r = await cycle(agent, procserver, tmp_path, key, guest)
        assert r.tracking == {"vda": "scan"} and "checkpoint" in r.fallbacks["vda"]
        assert backup.rescans == 1
        prom = Path(cfg.metrics_file).read_text()
        assert 'siterecovery_agent_tracker_fallbacks_total{machine="vm01",disk="vda"} 1' \
            in prom

        guest.write(0x44, 16 << 20, 1000)  # tracked again from the last cycle on
        r = await cycle(agent, procserver, tmp_path, key, guest)
        assert (r.tracking, r.fallbacks, r.bytes_read) == ({"vda": "libvirt"}, {}, BS)
        # The base's checkpoint and this cycle's: older ones went at this hold.
        assert len(virsh(guest.uri, "checkpoint-list", guest.name, "--name").split()) == 2
    finally:
        agent.close()

    # The agent killed in a cycle leaves its backup running (begun here by hand, as
    # the agent does); a new agent on the same state ends it and goes on from the
    # checkpoints (they live in the images, the mapping in the state directory); due
    # for a verification scan, it reads the disk whole and finds nothing missed.
    stale = Path(cfg.libvirt_socket_dir) / "nbd-killed"
    stale.mkdir()
    shutil.chown(stale, *guest.owner())
    (stale / "b.xml").write_text(
        f"<domainbackup mode='pull'><server transport='unix' socket='{stale}/nbd.sock'/>"
        f"<disks><disk name='vda' backup='yes' type='file'><scratch "
        f"file='{stale}/vda.scratch'/></disk></disks></domainbackup>")
    virsh(guest.uri, "backup-begin", guest.name, "--backupxml", str(stale / "b.xml"))
    cfg = dataclasses.replace(cfg, tracker_verify_hours=1e-9)
    agent = Agent(cfg)
    try:
        guest.write(0x55, 40 << 20, 3 * BS)
        r = await cycle(agent, procserver, tmp_path, key, guest)
        assert (r.kind, r.tracking, r.fallbacks, r.missed) == (
            "delta", {"vda": "libvirt"}, {}, {"vda": 0})
        assert r.bytes_read >= 4 << 20 and r.blocks_sent == 3
        assert not stale.exists()
    finally:
        agent.close()


async def test_two_domains_of_one_host_each_by_its_own_agent_at_once(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        uri: str) -> None:
    """Several VMs of one host (systemd/siterecovery-mobility@.service: an instance per
    domain): two agents, each its machine, state and socket folder, cycle at the same
    time; each reads only its own domain's writes and every point is exact."""
    with running_guest(uri, tmp_path / "g1") as g1, running_guest(uri, tmp_path / "g2") as g2:
        guests = {"vm01": g1, "vm02": g2}
        agents = {n: Agent(agent_config(
            tmp_path, pki, n, procserver.port, {"vda": g.image}, snapshot="libvirt",
            libvirt_uri=uri, libvirt_domain=g.name,
            libvirt_socket_dir=str(tmp_path / "run" / n))) for n, g in guests.items()}
        try:
            for rnd, (n1, n2) in enumerate(((1, 3), (2, 0))):
                g1.write(0x10 + rnd, (rnd * 8) << 20, n1 * BS)
                if n2:
                    g2.write(0x20 + rnd, (rnd * 16) << 20, n2 * BS)
                want = {n: g.sha() for n, g in guests.items()}
                rs = dict(zip(agents, await asyncio.gather(
                    *(a.replicate_once() for a in agents.values())), strict=True))
                for n, r in rs.items():
                    await point_restores_to(procserver, tmp_path, vault_at[1], r.cycle,
                                            {"vda": want[n]})
                if rnd:  # deltas: each read what its own guest wrote, nothing else
                    assert (rs["vm01"].tracking, rs["vm01"].bytes_read) == (
                        {"vda": "libvirt"}, n1 * BS)
                    assert (rs["vm02"].tracking, rs["vm02"].bytes_read) == (
                        {"vda": "libvirt"}, 0)
        finally:
            for a in agents.values():
                a.close()


async def test_a_raw_image_is_read_whole_every_cycle_and_says_why(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        uri: str) -> None:
    """libvirt keeps dirty bitmaps in qcow2 images only: a domain with a raw disk is
    backed up whole, without a checkpoint, every cycle, the reason in the cycle's
    fallbacks; every point exact all the same."""
    with running_guest(uri, tmp_path, "raw") as g:
        agent = Agent(agent_config(tmp_path, pki, "vm03", procserver.port, {"vda": g.image},
                                   snapshot="libvirt", libvirt_uri=uri, libvirt_domain=g.name,
                                   libvirt_socket_dir=str(tmp_path / "run")))
        try:
            g.write(0x61, 0, 1 << 20)
            r = await cycle(agent, procserver, tmp_path, vault_at[1], g)
            assert r.kind == "full"
            g.write(0x62, 20 << 20, BS)
            r = await cycle(agent, procserver, tmp_path, vault_at[1], g)
            assert (r.kind, r.tracking, r.blocks_sent) == ("delta", {"vda": "scan"}, 1)
            assert "vda (raw) is not" in r.fallbacks["vda"]
            assert "convert the image to qcow2" in r.fallbacks["vda"]
            assert virsh(uri, "checkpoint-list", g.name, "--name").split() == []
        finally:
            agent.close()
