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

The requirements that need no host are in ``targets.libvirtcheck``, the networks in
``targets.libvirtnet``, the boot proof in ``targets.libvirtboot``, the disks Re-protect
and Failback read in ``targets.libvirtrest``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from common.fs import atomic_write
from targets import instantlibvirt, libvirtboot, libvirtcopy, libvirtrest
from targets.base import (
    BootProof,
    Recovered,
    RecoveryDisk,
    RecoverySpec,
    Refusal,
    TargetError,
)
from targets.domainxml import DomainLayout, NbdSource, domain_xml
from targets.instant import InstantDisk, InstantSource
from targets.instantserve import InstantServers
from targets.kvm import KvmProbe, probe_kvm
from targets.libvirtcheck import (
    check_boot,
    check_disks,
    check_size,
    check_vm_name,
    mac_for,
    missing_images,
)
from targets.libvirtnet import LibvirtNetworks
from targets.virsh import Virsh

OWNER = "recovery.json"  # in a machine's folder: the recovery that made it


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
        self.drill_network = drill_network
        self.nets = LibvirtNetworks(self.virsh, drill_network, drill_bridge,
                                    ipaddress.IPv4Network(drill_subnet))
        self.accel = accel
        self._kvm: KvmProbe | None = None
        # the NBD servers of instant recoveries: this process serves them
        self.instant = instant or InstantServers(instantlibvirt.emulator_owner(uri))

    # ---- check ----------------------------------------------------------------------

    async def check(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> list[Refusal]:
        out = check_vm_name(spec)
        if not out and await self.virsh.exists("domain", spec.vm_name) and not \
                await asyncio.to_thread(_began_by, self.pool_dir / spec.vm_name, spec):
            # (a domain that an unfinished create of this recovery began: create replaces it)
            out.append(Refusal("vm_name", f"{spec.vm_name!r}: a domain of that name already "
                                          f"exists on {self.uri}; choose another name"))
        out += check_size(spec, await self._max_vcpus(), await self._host_memory_mib())
        out += check_disks(disks)
        out += check_boot(spec)
        out += await self.nets.check(spec, self.network)
        return out

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
                                + missing_images(disks), None)

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
            await self.cleanup(self.planned(spec, []))
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
        mac = spec.mac or mac_for(spec.vm_name)
        network = self.nets.network_for(spec, self.network)
        if spec.drill:
            rec.resources.append(f"network:{network}")
            await self.nets.ensure_drill()
        virt_type = await self._virt_type()
        rec.details.update(uri=self.uri, network=network, mac=mac, virt_type=virt_type,
                           console_log=str(console), drill="yes" if spec.drill else "no",
                           boot_marker=spec.boot_marker or "")
        if self._kvm is not None:
            rec.details["kvm"] = self._kvm.reason
        if spec.ip is not None and self.nets.reserves(spec):
            rec.resources.append(f"dhcp-host:{network}|{mac}|{spec.ip}")
            await self.nets.reserve(network, mac, spec.ip, spec.vm_name)
        xml = domain_xml(spec, DomainLayout(virt_type, images, mac, network, console))
        rec.resources.append(f"domain:{spec.vm_name}")
        await self.virsh.define("define", xml)
        # made whole: from now on its recovery is recorded, and only its cleanup removes it
        await asyncio.to_thread(atomic_write, folder / OWNER,
                                json.dumps({**_owner(spec), "complete": True}), 0o644)

    # ---- boot -----------------------------------------------------------------------

    async def boot(self, recovered: Recovered, timeout: float) -> BootProof:
        """``targets.libvirtboot.boot`` of the recovered domain (a drill's network made
        again first: another drill's cleanup may have removed it)."""
        if recovered.details.get("drill") == "yes":
            await self.nets.ensure_drill()
        return await libvirtboot.boot(self.virsh, recovered.vm_name,
                                      Path(recovered.details["console_log"]),
                                      recovered.details.get("boot_marker") or None, timeout)

    async def disks_at_rest(self, recovered: Recovered, shutdown_timeout: float | None,
                            paused_ok: bool = False) -> list[tuple[str, Path]]:
        """The recovered domain's images, read on the host while it is shut off
        (``targets.libvirtrest``: a running one is asked to shut down first when
        ``shutdown_timeout`` is given, else refused unless it is to be read paused)."""
        return await libvirtrest.disks_at_rest(self.virsh, recovered, shutdown_timeout,
                                               paused_ok)

    async def pause_for_read(self, recovered: Recovered) -> bool:
        return await libvirtrest.pause_for_read(self.virsh, recovered)

    async def resume(self, recovered: Recovered) -> None:
        await libvirtrest.resume(self.virsh, recovered)

    async def running(self, recovered: Recovered) -> bool:
        return await libvirtrest.state(self.virsh, recovered.vm_name) == "running"

    async def copy_running(self, recovered: Recovered, timeout: float,
                           progress: Callable[[float], Awaitable[None]] | None = None
                           ) -> list[tuple[str, Path]]:
        """The running domain's disks copied at one moment while it runs on
        (``targets.libvirtcopy``); ``drop_copies`` removes them."""
        return await libvirtcopy.copy_running(self.virsh, recovered, timeout, progress)

    async def drop_copies(self, recovered: Recovered) -> None:
        await libvirtcopy.end_stale(self.virsh, recovered)
        await libvirtcopy.drop(recovered)

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
                await self.nets.unreserve(net, mac, ip, recovered.vm_name)
            elif kind == "network":
                await self.nets.remove_drill_if_unused(what)
            elif kind == "file":
                Path(what).unlink(missing_ok=True)
            elif kind == "dir":
                _remove_tree(Path(what))
            elif kind == "instant":
                await self.instant.stop(what)
            else:
                raise TargetError("cleanup", f"unknown resource {res!r} on {recovered.vm_name}",
                                  "remove it by hand")

    def planned(self, spec: RecoverySpec, disks: Sequence[object] = ()) -> Recovered:
        """Everything a ``create`` (or ``create_instant``) of ``spec`` may make, in the
        order it makes it (``cleanup`` skips what is not there)."""
        folder = self.pool_dir / spec.vm_name
        rec = Recovered(self.name, spec.vm_name, [f"dir:{folder}",
                                                  f"instant:{spec.vm_name}"])
        network = self.nets.network_for(spec, self.network)
        if spec.drill:
            rec.resources.append(f"network:{network}")
        if spec.ip is not None and self.nets.reserves(spec):
            mac = spec.mac or mac_for(spec.vm_name)
            rec.resources.append(f"dhcp-host:{network}|{mac}|{spec.ip}")
        rec.resources.append(f"domain:{spec.vm_name}")
        return rec


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
