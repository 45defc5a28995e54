"""The libvirt target's requirements that need no host: names, MACs, disks, firmware.

The host's own limits (CPUs, memory, networks) are asked of libvirt by
``targets.libvirt.LibvirtTarget.check``; each refusal names the setting and the values
allowed."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from targets.base import RecoveryDisk, RecoverySpec, Refusal

VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_DISKS = 26  # vda … vdz
MIN_MEMORY_MIB = 64


def check_vm_name(spec: RecoverySpec) -> list[Refusal]:
    if VM_NAME.match(spec.vm_name):
        return []
    return [Refusal("vm_name", f"{spec.vm_name!r}: 1-63 letters, digits, '_', '.', '-', "
                               "starting with a letter or digit")]


def check_size(spec: RecoverySpec, max_cpus: int, host_mib: int) -> list[Refusal]:
    """CPUs and memory within the host's."""
    out: list[Refusal] = []
    if not 1 <= spec.cpus <= max_cpus:
        out.append(Refusal("cpus", f"{spec.cpus}: 1 to {max_cpus} on this host"))
    if not MIN_MEMORY_MIB <= spec.memory_mib <= host_mib:
        out.append(Refusal("memory_mib", f"{spec.memory_mib}: {MIN_MEMORY_MIB} to "
                                         f"{host_mib} MiB on this host"))
    return out


def check_boot(spec: RecoverySpec) -> list[Refusal]:
    """The MAC, the firmware and the boot marker."""
    out: list[Refusal] = []
    if spec.mac is not None and (not MAC.match(spec.mac) or int(spec.mac[:2], 16) & 1):
        out.append(Refusal("mac", f"{spec.mac!r}: a unicast MAC, six lower-case hex "
                                  "pairs separated by ':' (52:54:00:12:34:56)"))
    if spec.firmware not in ("bios", "uefi"):
        out.append(Refusal("firmware", f"{spec.firmware!r}: bios or uefi"))
    elif spec.firmware == "uefi" and not ovmf_installed():
        out.append(Refusal("firmware", "uefi: this host has no OVMF firmware (Debian "
                                       "package ovmf); allowed here: bios"))
    if spec.boot_marker is not None and (not spec.boot_marker.strip()
                                         or "\n" in spec.boot_marker):
        out.append(Refusal("boot_marker", f"{spec.boot_marker!r}: one non-empty line"))
    return out


def check_disks(disks: list[RecoveryDisk]) -> list[Refusal]:
    out = []
    if not 1 <= len(disks) <= MAX_DISKS:
        out.append(Refusal("disks", f"{len(disks)} disks: 1 to {MAX_DISKS} (vda … vdz)"))
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        out.append(Refusal("disks", f"disk names repeat: {names}"))
    for d in disks:
        # check runs before the restore too (base.py): an image not there yet is judged
        # by the size it will have; create refuses one still missing (missing_images)
        on_disk = d.path.stat().st_size if d.path.is_file() else d.size
        if d.size <= 0 or d.size % 512 or on_disk != d.size:
            out.append(Refusal("disks", f"{d.name}: {d.size} bytes; a raw image whose size "
                                        f"is a positive multiple of 512 and matches the "
                                        f"file ({on_disk})"))
    return out


def missing_images(disks: list[RecoveryDisk]) -> list[Refusal]:
    return [Refusal("disks", f"{d.name}: no image at {d.path}")
            for d in disks if not d.path.is_file()]


def ovmf_installed() -> bool:
    return any(Path("/usr/share/OVMF").glob("OVMF_CODE*.fd"))


def mac_for(vm_name: str) -> str:
    """A stable locally administered MAC in QEMU's 52:54:00 range for a machine name."""
    h = hashlib.sha256(vm_name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])
