"""The libvirt XML of a recovered machine and of the isolated drill network.

Built with ElementTree so every value from a recovery's settings is escaped; nothing here
talks to libvirt."""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from targets.base import RecoverySpec

NS = "https://siterecovery.invalid/xmlns/recovery/1"
ET.register_namespace("siterecovery", NS)  # libvirt keeps <metadata> children by namespace


@dataclass(frozen=True)
class NbdSource:
    """A disk served over NBD on a UNIX socket (instant recovery) instead of an image."""

    socket: Path


NBD_RECONNECT_SECONDS = 5  # QEMU retries a lost NBD connection this long before failing I/O


@dataclass(frozen=True)
class DomainLayout:
    """What the target decided for one domain, beyond the spec."""

    virt_type: str  # "kvm" or "qemu"
    images: list[Path | NbdSource]  # in the spec's disk order: vda, vdb, …
    mac: str
    network: str
    console_log: Path


def disk_target(index: int) -> str:
    """vda … vdz: virtio disk names in order (the target refuses more than 26 disks)."""
    return "vd" + chr(ord("a") + index)


def domain_xml(spec: RecoverySpec, layout: DomainLayout) -> str:
    dom = ET.Element("domain", type=layout.virt_type)
    ET.SubElement(dom, "name").text = spec.vm_name
    meta = ET.SubElement(dom, "metadata")
    ET.SubElement(meta, f"{{{NS}}}recovery", machine=spec.machine,
                  drill="yes" if spec.drill else "no")
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.cpus)
    os_ = ET.SubElement(dom, "os")
    if spec.firmware == "uefi":
        os_.set("firmware", "efi")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "boot", dev="hd")
    if spec.firmware != "uefi":
        # SeaBIOS's messages ("Boot failed: not a bootable disk") reach the serial console
        ET.SubElement(os_, "bios", useserial="yes")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if layout.virt_type == "kvm":
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    dev = ET.SubElement(dom, "devices")
    for i, image in enumerate(layout.images):
        if isinstance(image, NbdSource):
            disk = ET.SubElement(dev, "disk", type="network", device="disk")
            ET.SubElement(disk, "driver", name="qemu", type="raw")
            source = ET.SubElement(disk, "source", protocol="nbd")
            ET.SubElement(source, "host", transport="unix", socket=str(image.socket))
            ET.SubElement(source, "reconnect", delay=str(NBD_RECONNECT_SECONDS))
        else:
            disk = ET.SubElement(dev, "disk", type="file", device="disk")
            ET.SubElement(disk, "driver", name="qemu", type="raw")
            ET.SubElement(disk, "source", file=str(image))
        ET.SubElement(disk, "target", dev=disk_target(i), bus="virtio")
    nic = ET.SubElement(dev, "interface", type="network")
    ET.SubElement(nic, "source", network=layout.network)
    ET.SubElement(nic, "mac", address=layout.mac)
    ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(nic, "rom", enabled="no")  # no iPXE: a recovered machine boots its disks
    # A pty serial port (virsh console works) whose output virtlogd also writes to a file:
    # the boot proof reads that file.
    serial = ET.SubElement(dev, "serial", type="pty")
    ET.SubElement(serial, "log", file=str(layout.console_log), append="off")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(dev, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(dev, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def with_local_disks(xml: str, images: dict[str, Path]) -> str:
    """A domain's XML (``virsh dumpxml``) with the disks of targets ``images`` names (vda
    …) on those raw images instead of what they were on (NBD after an instant
    recovery's pivot); the rest as it was."""
    dom = ET.fromstring(xml)
    for disk in dom.iterfind("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev is None or dev not in images:
            continue
        disk.set("type", "file")
        for old in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(old)
        driver = disk.find("driver")
        at = 0 if driver is None else list(disk).index(driver) + 1
        disk.insert(at, ET.Element("source", file=str(images[dev])))
    return ET.tostring(dom, encoding="unicode")


def isolated_network_xml(name: str, bridge: str, subnet: ipaddress.IPv4Network) -> str:
    """A network with DHCP and no ``<forward>``: guests reach each other and the host's
    bridge address, nothing beyond (a drill never meets production)."""
    hosts = list(subnet.hosts())
    net = ET.Element("network")
    ET.SubElement(net, "name").text = name
    ET.SubElement(net, "bridge", name=bridge, stp="on", delay="0")
    ip = ET.SubElement(net, "ip", address=str(hosts[0]), netmask=str(subnet.netmask))
    dhcp = ET.SubElement(ip, "dhcp")
    ET.SubElement(dhcp, "range", start=str(hosts[len(hosts) // 2]), end=str(hosts[-1]))
    return ET.tostring(net, encoding="unicode")


def dhcp_host_xml(mac: str, ip: str, name: str) -> str:
    return ET.tostring(ET.Element("host", mac=mac, ip=ip, name=name), encoding="unicode")


def network_subnets(xml: str) -> list[ipaddress.IPv4Network]:
    """The IPv4 subnets a network's XML (``virsh net-dumpxml``) serves."""
    out = []
    for ip in ET.fromstring(xml).findall("ip"):
        if ip.get("family", "ipv4") != "ipv4" or ip.get("address") is None:
            continue
        mask = ip.get("netmask") or ip.get("prefix") or "24"
        out.append(ipaddress.IPv4Network(f"{ip.get('address')}/{mask}", strict=False))
    return out


def network_connections(xml: str) -> int:
    """How many running guest interfaces use the network (0 when it is not active)."""
    return int(ET.fromstring(xml).get("connections", "0"))
