"""The libvirt target: a recovered machine as a libvirt domain on a KVM/QEMU host.

``create`` copies (reflinks where the filesystem can) the restored raw images into
``pool_dir/<vm_name>/``, defines a domain with the spec's CPUs, memory, MAC and disks on
virtio in order, and a serial console that virtlogd also writes to ``console.log`` there.
A drill attaches the machine to an isolated network (no ``<forward>``: no route out),
created on demand; a failover to ``spec.network`` (else the target's network). A static
IP becomes a DHCP host reservation on the machine's network. ``boot`` starts it and reads
``console.log`` until the marker (or a login prompt) appears. ``cleanup`` removes all of
it, and the drill network once no running machine uses it.

Resources named on ``Recovered.resources``: ``dir:<folder>``, ``file:<image or log>``,
``network:<drill network>``, ``dhcp-host:<network>|<mac>|<ip>``, ``domain:<name>``,
``instant:<name>`` (the NBD servers of an instant recovery, ``targets.instantlibvirt``).

``create_instant`` (``targets.instant``) makes the same machine on disks served over NBD
from the vault by this process instead of copied images; ``pivot_instant`` later moves it
onto local images without a reboot.

An existing folder is never reused, except one that ``create`` itself began for the same
recovery (machine, point, drill or not: ``recovery.json`` in it, written first, marked
complete once the domain is defined) and was interrupted before it finished (the
configuration server killed part way): what that attempt may have made is removed and
the machine made anew.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from common.fs import atomic_write
from targets import instantlibvirt
from targets.base import (
    BootFailedError,
    BootProof,
    Recovered,
    RecoveryDisk,
    RecoverySpec,
    Refusal,
    TargetError,
)
from targets.console import ConsoleLog, proves_boot
from targets.domainxml import (
    DomainLayout,
    NbdSource,
    dhcp_host_xml,
    domain_xml,
    isolated_network_xml,
    network_connections,
    network_subnets,
)
from targets.instant import InstantDisk, InstantSource
from targets.instantserve import InstantServers
from targets.kvm import KvmProbe, probe_kvm
from targets.virsh import Virsh

VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_DISKS = 26  # vda … vdz
OWNER = "recovery.json"  # in a machine's folder: the recovery that made it
MIN_MEMORY_MIB = 64
# console lines after which no boot follows: fail now rather than at the timeout
FATAL = re.compile(r"No bootable device|Kernel panic - not syncing|"
                   r"siterecovery-boot-failed")
POLL = 0.2  # seconds between reads of the console log while waiting for a boot


class LibvirtTarget:
    """``targets.base.Target`` on libvirt through ``virsh``.

    ``accel``: "auto" (KVM when ``targets.kvm.probe_kvm`` finds it working, else QEMU's
    emulation), "kvm" or "qemu". ``drill_subnet`` must not overlap a network the host
    reaches: drills attach there and must never meet production."""

    name = "libvirt"

    def __init__(self, uri: str = "qemu:///system",
                 pool_dir: Path = Path("/var/lib/siterecovery/libvirt"),
                 network: str = "default",
                 drill_network: str = "siterecovery-drill",
                 drill_bridge: str = "virbr-srdrill",
                 drill_subnet: str = "10.213.0.0/24",
                 accel: str = "auto", instant: InstantServers | None = None) -> None:
        if accel not in ("auto", "kvm", "qemu"):
            raise ValueError(f"accel {accel!r}: auto, kvm or qemu")
        self.virsh = Virsh(uri)
        self.uri, self.pool_dir, self.network = uri, pool_dir, network
        self.drill_network, self.drill_bridge = drill_network, drill_bridge
        self.drill_subnet = ipaddress.IPv4Network(drill_subnet)
        self.accel = accel
        self._kvm: KvmProbe | None = None
        self._net_lock = asyncio.Lock()  # one create/remove of the drill network at a time
        # the NBD servers of instant recoveries: this process serves them
        self.instant = instant or InstantServers(instantlibvirt.emulator_owner(uri))

    # ---- check ----------------------------------------------------------------------

    async def check(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> list[Refusal]:
        out: list[Refusal] = []
        if not VM_NAME.match(spec.vm_name):
            out.append(Refusal("vm_name", f"{spec.vm_name!r}: 1-63 letters, digits, '_', "
                                          "'.', '-', starting with a letter or digit"))
        elif await self.virsh.exists("domain", spec.vm_name) and not await asyncio.to_thread(
                _began_by, self.pool_dir / spec.vm_name, spec):  # else create replaces it
            out.append(Refusal("vm_name", f"{spec.vm_name!r}: a domain of that name already "
                                          f"exists on {self.uri}; choose another name"))
        max_cpus = await self._max_vcpus()
        if not 1 <= spec.cpus <= max_cpus:
            out.append(Refusal("cpus", f"{spec.cpus}: 1 to {max_cpus} on this host"))
        host_mib = await self._host_memory_mib()
        if not MIN_MEMORY_MIB <= spec.memory_mib <= host_mib:
            out.append(Refusal("memory_mib", f"{spec.memory_mib}: {MIN_MEMORY_MIB} to "
                                             f"{host_mib} MiB on this host"))
        out += _check_disks(disks)
        if spec.mac is not None and (not MAC.match(spec.mac) or int(spec.mac[:2], 16) & 1):
            out.append(Refusal("mac", f"{spec.mac!r}: a unicast MAC, six lower-case hex "
                                      "pairs separated by ':' (52:54:00:12:34:56)"))
        if spec.firmware not in ("bios", "uefi"):
            out.append(Refusal("firmware", f"{spec.firmware!r}: bios or uefi"))
        elif spec.firmware == "uefi" and not _ovmf_installed():
            out.append(Refusal("firmware", "uefi: this host has no OVMF firmware (Debian "
                                           "package ovmf); allowed here: bios"))
        if spec.boot_marker is not None and (not spec.boot_marker.strip()
                                             or "\n" in spec.boot_marker):
            out.append(Refusal("boot_marker", f"{spec.boot_marker!r}: one non-empty line"))
        out += await self._check_network(spec)
        return out

    async def _check_network(self, spec: RecoverySpec) -> list[Refusal]:
        ip = None
        if spec.ip is not None:
            try:
                ip = ipaddress.IPv4Address(spec.ip)
            except ValueError:
                return [Refusal("ip", f"{spec.ip!r}: an IPv4 address, or none for DHCP")]
        if spec.drill:
            return []  # the drill network is made on demand; a production IP is not used
        net = spec.network or self.network
        if not await self.virsh.exists("network", net):
            names = (await self.virsh("net-list", "--all", "--name")).split()
            return [Refusal("network", f"{net!r} is not a network on {self.uri}; there: "
                                       f"{', '.join(names) or 'none'}")]
        if ip is not None:
            subnets = network_subnets(await self.virsh("net-dumpxml", net))
            if not any(ip in s for s in subnets):
                return [Refusal("ip", f"{ip} is outside network {net!r} "
                                      f"({', '.join(map(str, subnets)) or 'no IPv4'})")]
        return []

    async def _max_vcpus(self) -> int:
        return int((await self.virsh("maxvcpus", "--type", await self._virt_type())).strip())

    async def _host_memory_mib(self) -> int:
        info = await self.virsh("nodeinfo")
        m = re.search(r"Memory size:\s+(\d+) KiB", info)
        if m is None:
            raise TargetError("libvirt", f"virsh nodeinfo gave no memory size: {info!r}")
        return int(m.group(1)) // 1024

    async def _virt_type(self) -> str:
        if self.accel != "auto":
            return self.accel
        if self._kvm is None:
            self._kvm = await asyncio.to_thread(probe_kvm)
        return "kvm" if self._kvm.usable else "qemu"

    # ---- create ---------------------------------------------------------------------

    async def create(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> Recovered:
        return await self._make(spec, disks, await self.check(spec, disks)
                                + _missing_images(disks), None)

    async def create_instant(self, spec: RecoverySpec, disks: list[InstantDisk],
                             source: InstantSource) -> Recovered:
        """As ``create``, on disks served over NBD from ``source`` by this process."""
        planned = [RecoveryDisk(d.name, self.pool_dir / spec.vm_name / f"{d.name}.raw", d.size)
                   for d in disks]  # not there yet: judged by their sizes
        return await self._make(spec, disks, await self.check(spec, planned), source)

    async def serve_instant(self, recovered: Recovered, source: InstantSource) -> None:
        await instantlibvirt.serve(self.instant, recovered, source)

    def nbd_sockets(self, recovered: Recovered) -> dict[str, Path]:
        return {d.name: d.socket for d in instantlibvirt.of(recovered)}

    async def hydrate_instant(self, recovered: Recovered, rate_mbps: float) -> None:
        await instantlibvirt.hydrate(self.instant, recovered, rate_mbps)

    def instant_progress(self, recovered: Recovered) -> tuple[int, int]:
        return instantlibvirt.progress(self.instant, recovered)

    async def pivot_instant(self, recovered: Recovered) -> Recovered:
        return await instantlibvirt.pivot(self.virsh, self.instant, recovered)

    async def _make(self, spec: RecoverySpec, disks: Sequence[RecoveryDisk | InstantDisk],
                    refusals: list[Refusal], source: InstantSource | None) -> Recovered:
        if refusals:
            raise TargetError("spec_refused", "; ".join(f"{r.setting}: {r.message}"
                                                        for r in refusals),
                              "change the item's recovery settings")
        folder = self.pool_dir / spec.vm_name
        if await asyncio.to_thread(_began_by, folder, spec):
            await self.cleanup(self._leftovers(spec, folder))
        rec = Recovered(self.name, spec.vm_name)
        try:
            await self._create(spec, disks, rec, source)
        except TargetError as e:
            e.recovered = rec
            raise
        except OSError as e:
            raise TargetError("create_failed", f"{spec.vm_name}: {e}",
                              f"free space or permissions under {self.pool_dir}",
                              recovered=rec) from e
        return rec

    async def _create(self, spec: RecoverySpec, disks: Sequence[RecoveryDisk | InstantDisk],
                      rec: Recovered, source: InstantSource | None) -> None:
        folder = self.pool_dir / spec.vm_name
        self.pool_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        folder.mkdir(mode=0o711)  # an existing folder is someone else's: never reuse it
        folder.chmod(0o711)  # the emulator runs as libvirt-qemu: it must reach the images
        rec.resources.append(f"dir:{folder}")
        await asyncio.to_thread(atomic_write, folder / OWNER, json.dumps(_owner(spec)), 0o644)
        images: list[Path | NbdSource] = []
        if source is not None:
            images += await instantlibvirt.start(
                self.instant, rec, instantlibvirt.layout(folder, [d.name for d in disks]), source)
        for i, d in enumerate(disks if source is None else ()):
            assert isinstance(d, RecoveryDisk)
            image = folder / f"{i:02d}-{d.name}.raw"
            rec.resources.append(f"file:{image}")
            await _copy(d.path, image)
            images.append(image)
        console = folder / "console.log"
        rec.resources.append(f"file:{console}")
        mac = spec.mac or _mac_for(spec.vm_name)
        if spec.drill:
            network = self.drill_network
            rec.resources.append(f"network:{network}")
            await self._ensure_drill_network()
        else:
            network = spec.network or self.network
        virt_type = await self._virt_type()
        rec.details.update(uri=self.uri, network=network, mac=mac, virt_type=virt_type,
                           console_log=str(console), drill="yes" if spec.drill else "no",
                           boot_marker=spec.boot_marker or "")
        if self._kvm is not None:
            rec.details["kvm"] = self._kvm.reason
        if spec.ip is not None and (not spec.drill or
                                    ipaddress.IPv4Address(spec.ip) in self.drill_subnet):
            rec.resources.append(f"dhcp-host:{network}|{mac}|{spec.ip}")
            await self._reserve(network, mac, spec.ip, spec.vm_name)
        xml = domain_xml(spec, DomainLayout(virt_type, images, mac, network, console))
        rec.resources.append(f"domain:{spec.vm_name}")
        await self.virsh.define("define", xml)
        # made whole: from now on its recovery is recorded, and only its cleanup removes it
        await asyncio.to_thread(atomic_write, folder / OWNER,
                                json.dumps({**_owner(spec), "complete": True}), 0o644)

    async def _ensure_drill_network(self) -> None:
        async with self._net_lock:
            if not await self.virsh.exists("network", self.drill_network):
                xml = isolated_network_xml(self.drill_network, self.drill_bridge,
                                           self.drill_subnet)
                await self.virsh.define("net-define", xml)
            info = await self.virsh("net-info", self.drill_network)
            if re.search(r"Active:\s+no", info):
                await self.virsh("net-start", self.drill_network)

    async def _reserve(self, network: str, mac: str, ip: str, name: str) -> None:
        await self.virsh("net-update", network, "add", "ip-dhcp-host",
                         dhcp_host_xml(mac, ip, name), *await self._update_flags(network))

    async def _update_flags(self, network: str) -> list[str]:
        """net-update's flags: the running network (--live) and its stored definition
        (--config), each where it exists (a transient network has no definition)."""
        info = await self.virsh("net-info", network)
        return [flag for flag, field in (("--live", "Active"), ("--config", "Persistent"))
                if re.search(rf"{field}:\s+yes", info)]

    # ---- boot -----------------------------------------------------------------------

    async def boot(self, recovered: Recovered, timeout: float) -> BootProof:
        """Start the domain and wait for the marker (or a login prompt) on its console.

        A domain already running is followed, not started again (``seconds`` then
        counts from this call). On no proof within ``timeout``, on a console line after
        which no boot follows, or on the machine stopping first, the domain is stopped
        (left defined, for cleanup) and ``BootFailedError`` carries the console's last
        lines."""
        name = recovered.vm_name
        log = ConsoleLog(Path(recovered.details["console_log"]))
        marker = recovered.details.get("boot_marker") or None
        if recovered.details.get("drill") == "yes":
            await self._ensure_drill_network()  # another drill's cleanup may have removed it
        started = time.monotonic()
        if not await self._running(name):
            await self.virsh("start", name)
        # else a boot already under way (a job resumed after a restart): follow it; its
        # console log holds this run from its start (append='off')
        deadline = started + timeout
        while True:
            line = log.find(lambda ln: proves_boot(ln, marker) or bool(FATAL.search(ln)))
            if line is not None and FATAL.search(line):
                await self.virsh.gone("destroy", name)
                raise BootFailedError(f"{name} cannot boot: its console shows {line!r}",
                                      log.tail())
            if line is not None:
                return BootProof(time.monotonic() - started, line, log.tail())
            if not await self._running(name):
                log.find(lambda ln: False)  # what it printed last, before it stopped
                raise BootFailedError(f"{name} stopped before it showed "
                                      f"{marker or 'a login prompt'} on its console",
                                      log.tail())
            if time.monotonic() > deadline:
                await self.virsh.gone("destroy", name)
                log.find(lambda ln: False)
                raise BootFailedError(f"{name} showed no {marker or 'login prompt'} on "
                                      f"its console within {timeout:g} s", log.tail())
            await asyncio.sleep(POLL)

    async def _running(self, name: str) -> bool:
        return (await self.virsh("domstate", name)).strip() in ("running", "paused",
                                                                 "in shutdown")

    # ---- cleanup --------------------------------------------------------------------

    async def close(self) -> None:
        """Stop serving instantly recovered disks (a restarted server serves them again
        from their overlays; meanwhile their guests get I/O errors, never other data)."""
        await self.instant.close()

    async def cleanup(self, recovered: Recovered) -> None:
        """Remove what ``create`` made, newest first; what is already gone is skipped."""
        for res in reversed(recovered.resources):
            kind, _, what = res.partition(":")
            if kind == "domain":
                await self.virsh.gone("destroy", what)
                await self.virsh.gone("undefine", what, "--nvram")
            elif kind == "dhcp-host":
                net, mac, ip = what.split("|")
                await self._unreserve(net, mac, ip, recovered.vm_name)
            elif kind == "network":
                await self._remove_drill_network_if_unused(what)
            elif kind == "file":
                Path(what).unlink(missing_ok=True)
            elif kind == "dir":
                _remove_tree(Path(what))
            elif kind == "instant":
                await self.instant.stop(what)
            else:
                raise TargetError("cleanup", f"unknown resource {res!r} on {recovered.vm_name}",
                                  "remove it by hand")

    def _leftovers(self, spec: RecoverySpec, folder: Path) -> Recovered:
        """Everything an interrupted ``create`` of ``spec`` may have made (``cleanup``
        skips what is not there), in the order ``_create`` makes it."""
        rec = Recovered(self.name, spec.vm_name, [f"dir:{folder}",
                                                  f"instant:{spec.vm_name}"])
        network = self.drill_network if spec.drill else spec.network or self.network
        if spec.drill:
            rec.resources.append(f"network:{network}")
        if spec.ip is not None and (not spec.drill or
                                    ipaddress.IPv4Address(spec.ip) in self.drill_subnet):
            mac = spec.mac or _mac_for(spec.vm_name)
            rec.resources.append(f"dhcp-host:{network}|{mac}|{spec.ip}")
        rec.resources.append(f"domain:{spec.vm_name}")
        return rec

    async def _unreserve(self, net: str, mac: str, ip: str, name: str) -> None:
        if not await self.virsh.exists("network", net):
            return
        await self.virsh.gone("net-update", net, "delete", "ip-dhcp-host",
                              dhcp_host_xml(mac, ip, name), *await self._update_flags(net))

    async def _remove_drill_network_if_unused(self, net: str) -> None:
        async with self._net_lock:
            if not await self.virsh.exists("network", net):
                return
            if network_connections(await self.virsh("net-dumpxml", net)) > 0:
                return  # another drill's machine runs on it; its cleanup removes it
            await self.virsh.gone("net-destroy", net)
            await self.virsh.gone("net-undefine", net)


def _check_disks(disks: list[RecoveryDisk]) -> list[Refusal]:
    out = []
    if not 1 <= len(disks) <= MAX_DISKS:
        out.append(Refusal("disks", f"{len(disks)} disks: 1 to {MAX_DISKS} (vda … vdz)"))
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        out.append(Refusal("disks", f"disk names repeat: {names}"))
    for d in disks:
        # check runs before the restore too (base.py): an image not there yet is judged
        # by the size it will have; create refuses one still missing (_missing_images)
        on_disk = d.path.stat().st_size if d.path.is_file() else d.size
        if d.size <= 0 or d.size % 512 or on_disk != d.size:
            out.append(Refusal("disks", f"{d.name}: {d.size} bytes; a raw image whose size "
                                        f"is a positive multiple of 512 and matches the "
                                        f"file ({on_disk})"))
    return out


def _missing_images(disks: list[RecoveryDisk]) -> list[Refusal]:
    return [Refusal("disks", f"{d.name}: no image at {d.path}")
            for d in disks if not d.path.is_file()]


def _owner(spec: RecoverySpec) -> dict[str, object]:
    return {"machine": spec.machine, "vm_name": spec.vm_name, "point": spec.point,
            "drill": spec.drill}


def _began_by(folder: Path, spec: RecoverySpec) -> bool:
    """Whether ``folder`` was begun by a ``create`` of this very recovery that did not
    finish (a finished one is its recovery's to clean up, never replaced here)."""
    try:
        return bool(json.loads((folder / OWNER).read_text()) == _owner(spec))
    except (OSError, ValueError):
        return False


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass  # removed by an earlier, interrupted cleanup


def _ovmf_installed() -> bool:
    return any(Path("/usr/share/OVMF").glob("OVMF_CODE*.fd"))


def _mac_for(vm_name: str) -> str:
    """A stable locally administered MAC in QEMU's 52:54:00 range for a machine name."""
    h = hashlib.sha256(vm_name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


async def _copy(src: Path, dst: Path) -> None:
    """Reflink where the filesystem can, else a sparse copy (holes stay holes)."""
    proc = await asyncio.create_subprocess_exec(
        "cp", "--reflink=auto", "--sparse=always", "--", str(src), str(dst),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise TargetError("create_failed", f"copy {src} to {dst}: {out.decode().strip()}",
                          "free space in the target's image folder")
