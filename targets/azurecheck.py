"""The Azure VM requirements a recovery must meet, checked before anything is made.

The limits are the ones Azure Site Recovery's prerequisites check applies to machines
failed over to Azure ("Support matrix for disaster recovery of VMware VMs and physical
servers to Azure", section "Azure VM requirements", learn.microsoft.com/azure/
site-recovery/vmware-physical-azure-support-matrix):

- OS disk: up to 2,048 GB for Generation 1 (BIOS) machines, up to 4,095 GB for
  Generation 2 (UEFI); exactly one OS disk;
- data disks: 64 or less (and no more than the VM size takes); each up to 32 TB when
  replicating to managed disks (a managed disk's largest size is 32,767 GiB), at least
  1 GB;
- VM name: 1 to 63 characters, letters, numbers and hyphens, starting and ending with
  a letter or number.

- boot: Generation 1 machines boot BIOS, Generation 2 UEFI; a restored OS disk that
  boots neither (``targets.bootmode``) is refused. The generation follows the disk: the
  item's ``firmware`` setting only chooses for a disk that boots both ways.

Azure's "GB" in these tables are GiB (2**30 bytes). Disk sizes are those of the
fixed VHD, the image padded up to whole MiB (Azure requires a whole number of MiB).
Each refusal names the setting and what is allowed. The VM size is the item's
``azure_size``, else the target's ``vm_size``, else the smallest offered size that fits.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from targets.armtemplate import subnet_id
from targets.base import RecoveryDisk, RecoverySpec, Refusal
from targets.bootmode import BootMode
from vault.vhd import vhd_size

GIB = 1 << 30
OS_DISK_MAX_GIB = {"bios": 2048, "uefi": 4095}
DATA_DISK_MAX_GIB = 32767
DATA_DISK_MIN_GIB = 1
DATA_DISKS_MAX = 64
GENERATION = {"bios": "V1", "uefi": "V2"}
VM_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
VM_NAME_RULE = ("1 to 63 letters, digits and hyphens, starting and ending with a letter "
                "or digit")
# A managed disk's name: 1-80 letters, digits, '_', '.', '-'; starts with a letter or
# digit, ends with a letter, digit or '_' (Azure's resource naming rules, Microsoft.Compute).
MANAGED_DISK_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,78}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class VmSize:
    cpus: int
    memory_mib: int
    max_data_disks: int
    gen2: bool  # supports Generation 2 (UEFI) VMs


# The sizes this target offers, from each series' page of "Sizes for virtual machines
# in Azure" (vCPUs, memory, max data disks) and "Support for generation 2 VMs on Azure"
# (the Av2 series is Generation 1 only). Smallest first within what a choice compares.
SIZES: dict[str, VmSize] = {
    "Standard_B1s": VmSize(1, 1024, 2, True),
    "Standard_B1ms": VmSize(1, 2048, 2, True),
    "Standard_A1_v2": VmSize(1, 2048, 2, False),
    "Standard_DS1_v2": VmSize(1, 3584, 4, True),
    "Standard_B2s": VmSize(2, 4096, 4, True),
    "Standard_A2_v2": VmSize(2, 4096, 4, False),
    "Standard_F2s_v2": VmSize(2, 4096, 4, True),
    "Standard_B2ms": VmSize(2, 8192, 4, True),
    "Standard_D2s_v3": VmSize(2, 8192, 4, True),
    "Standard_D2s_v5": VmSize(2, 8192, 4, True),
    "Standard_D2as_v5": VmSize(2, 8192, 4, True),
    "Standard_E2s_v5": VmSize(2, 16384, 4, True),
    "Standard_D4s_v3": VmSize(4, 16384, 8, True),
    "Standard_D4s_v5": VmSize(4, 16384, 8, True),
    "Standard_E4s_v5": VmSize(4, 32768, 8, True),
    "Standard_D8s_v3": VmSize(8, 32768, 16, True),
    "Standard_D8s_v5": VmSize(8, 32768, 16, True),
    "Standard_E8s_v5": VmSize(8, 65536, 16, True),
    "Standard_D16s_v5": VmSize(16, 65536, 32, True),
}


def managed_disk_name(vm_name: str, disk: str) -> str:
    return f"{vm_name}-{disk}"


def choose_size(spec: RecoverySpec, data_disks: int, firmware: str | None = None
                ) -> str | None:
    """The smallest offered size with the spec's CPUs and memory, its data disks and its
    firmware (``firmware``, else the spec's); None if no size fits."""
    uefi = (firmware or spec.firmware) == "uefi"
    fits = [(s.cpus, s.memory_mib, name) for name, s in SIZES.items()
            if s.cpus >= spec.cpus and s.memory_mib >= spec.memory_mib
            and s.max_data_disks >= data_disks and (s.gen2 or not uefi)]
    return min(fits)[2] if fits else None


@dataclass(frozen=True)
class Assessment:
    """What ``assess`` decided: the refusals, and what the machine will be if none."""

    refusals: list[Refusal]
    firmware: str  # bios | uefi: the disk's own when it was read, else the spec's
    vm_size: str | None  # None when no size fits (refused)
    firmware_note: str  # how the firmware was chosen, for the job's record


def resolve_firmware(spec: RecoverySpec, disks: list[RecoveryDisk], boot: BootMode | None
                     ) -> tuple[str, str, list[Refusal]]:
    """The firmware the machine gets, why, and the refusal of a disk no firmware boots.
    ``boot`` is the OS disk's boot mode (None: the disk is not restored yet)."""
    if boot is None or not disks:
        return spec.firmware, f"{spec.firmware}: the item's firmware setting (the disk " \
                              "is read once restored)", []
    chosen = boot.choose(spec.firmware)
    if chosen is None:
        return spec.firmware, "", [Refusal("disks", (
            f"OS disk {disks[0].name} boots neither with BIOS nor with UEFI "
            f"({boot.describe()}): Azure boots BIOS (Generation 1) or UEFI (Generation 2) "
            "machines only; the first of the item's disks must be its boot disk"))]
    if chosen == spec.firmware:
        return chosen, f"{chosen}: the item's firmware setting, and the disk boots with " \
                       f"it ({boot.describe()})", []
    return chosen, f"{chosen}: the disk boots with {chosen} only ({boot.describe()}); the " \
                   f"item's firmware setting {spec.firmware} would not boot it", []


def assess(spec: RecoverySpec, disks: list[RecoveryDisk], *, vm_size: str | None,
           network: str | None, boot: BootMode | None = None) -> Assessment:
    """Every Azure requirement ``spec`` and ``disks`` break, and the firmware and size.

    ``vm_size`` is the target's size (None: the spec's ``azure_size``, else chosen from
    the spec's CPUs and memory), ``network`` the ``VNET/SUBNET`` or subnet id this
    recovery uses (None: none set), ``boot`` the OS disk's boot mode (None: not read)."""
    out: list[Refusal] = []
    if not VM_NAME.fullmatch(spec.vm_name):
        out.append(Refusal("vm_name", f"vm_name {spec.vm_name!r} is not allowed on Azure: "
                                      f"{VM_NAME_RULE}"))
    if spec.firmware not in GENERATION:
        out.append(Refusal("firmware", f"firmware {spec.firmware!r} is not supported: "
                                       "bios (Generation 1) or uefi (Generation 2)"))
    firmware, note, refused = resolve_firmware(spec, disks, boot)
    out += refused
    out += _check_disks(firmware, spec.vm_name, disks)
    data = max(len(disks) - 1, 0)
    setting, size_name = ("azure_size", spec.azure_size) if spec.azure_size else \
        ("vm_size", vm_size)
    chosen: str | None = size_name
    if size_name is None:
        chosen = choose_size(spec, data, firmware)
        if chosen is None:
            out.append(Refusal("azure_size", f"no offered size has {spec.cpus} CPUs, "
                                              f"{spec.memory_mib} MiB, {data} data disks"
                                              f"{' and UEFI' if firmware == 'uefi' else ''}: "
                                              f"set azure_size to one of {', '.join(SIZES)}"))
    elif size_name not in SIZES:
        out.append(Refusal(setting, f"{setting} {size_name!r} is not offered: one of "
                                    f"{', '.join(SIZES)}"))
    else:
        size = SIZES[size_name]
        if data > size.max_data_disks:
            larger = ", ".join(n for n, s in SIZES.items() if s.max_data_disks >= data)
            out.append(Refusal("disks", f"{data} data disks, {setting} {size_name} takes at "
                                        f"most {size.max_data_disks}: choose a larger "
                                        f"{setting} ({larger or 'none offered'}) or fewer "
                                        "disks"))
        if firmware == "uefi" and not size.gen2:
            gen2 = ", ".join(n for n, s in SIZES.items() if s.gen2)
            out.append(Refusal(setting, f"{setting} {size_name!r} runs Generation 1 (BIOS) "
                                        f"machines only; for uefi use one of {gen2}"))
    if network is None:
        out.append(Refusal("network", "no network for this recovery: set the item's "
                                      "network (VNET/SUBNET or a subnet resource id)"))
    else:
        try:
            subnet_id(network)
        except ValueError as e:
            out.append(Refusal("network", str(e)))
    if spec.ip is not None:
        try:
            ip = ipaddress.ip_address(spec.ip)
        except ValueError:
            ip = None
        if ip is None or ip.version != 4 or not ip.is_private:
            out.append(Refusal("ip", f"ip {spec.ip!r} is not allowed: a private IPv4 "
                                     "address in the subnet, or none for a dynamic one"))
    return Assessment(out, firmware, chosen, note)


def check_vm(spec: RecoverySpec, disks: list[RecoveryDisk], *, vm_size: str | None,
             network: str | None, boot: BootMode | None = None) -> list[Refusal]:
    """Every Azure requirement ``spec`` and ``disks`` break (empty: all met); see
    ``assess``."""
    return assess(spec, disks, vm_size=vm_size, network=network, boot=boot).refusals


def _check_disks(firmware: str, vm_name: str, disks: list[RecoveryDisk]) -> list[Refusal]:
    out: list[Refusal] = []
    if not disks:
        return [Refusal("disks", "no disk to recover: Azure needs exactly one OS disk "
                                 "(the first) and up to 64 data disks")]
    if len(disks) - 1 > DATA_DISKS_MAX:
        out.append(Refusal("disks", f"{len(disks) - 1} data disks: Azure takes at most "
                                    f"{DATA_DISKS_MAX}"))
    firmware = firmware if firmware in OS_DISK_MAX_GIB else "bios"
    for i, d in enumerate(disks):
        gib = vhd_size(d.size) / GIB
        name = managed_disk_name(vm_name, d.name)
        if not MANAGED_DISK_NAME.fullmatch(name):
            out.append(Refusal(f"disk:{d.name}", f"managed disk name {name!r} is not allowed: "
                                                 "1-80 letters, digits, '_', '.', '-', ending "
                                                 "in a letter, digit or '_'"))
        if i == 0 and gib > OS_DISK_MAX_GIB[firmware]:
            gen = GENERATION[firmware][1]
            out.append(Refusal(f"disk:{d.name}", f"OS disk {d.name} is {gib:.1f} GiB: a "
                                                 f"Generation {gen} ({firmware}) machine's OS "
                                                 f"disk is at most {OS_DISK_MAX_GIB[firmware]} "
                                                 "GiB"))
        elif i > 0 and not DATA_DISK_MIN_GIB <= gib <= DATA_DISK_MAX_GIB:
            out.append(Refusal(f"disk:{d.name}", f"data disk {d.name} is {gib:.3f} GiB: a data "
                                                 f"disk is {DATA_DISK_MIN_GIB} to "
                                                 f"{DATA_DISK_MAX_GIB} GiB"))
    return out
