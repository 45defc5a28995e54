"""Whether hardware-accelerated KVM really works on this host (tried, not assumed).

``/dev/kvm`` existing is not enough: on a nested host its backend may be ``kvm_pvm``
(pagetable-based virtualisation, in software), which creates VMs and runs real- and
long-mode code but leaves an unmodified Linux kernel stuck in its decompressor — seen
on this project's build machine. So KVM counts as usable only when ``/dev/kvm`` opens
read-write, answers API version 12, creates a VM, and the module behind it is the
hardware one (``kvm_intel`` or ``kvm_amd``). Otherwise the target uses QEMU's emulation.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
HARDWARE_BACKENDS = ("kvm_intel", "kvm_amd")


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str  # why (not): shown in the recovery's details


def probe_kvm(device: Path = Path("/dev/kvm"),
              modules: Path = Path("/sys/module")) -> KvmProbe:
    """Try ``device``: open it, ask its API version, create (and drop) a VM."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return KvmProbe(False, f"{device}: {e.strerror}")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if version != 12:
            return KvmProbe(False, f"{device}: API version {version}, not 12")
        try:
            vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as e:
            return KvmProbe(False, f"{device}: cannot create a VM: {e.strerror}")
        os.close(vm)
    finally:
        os.close(fd)
    backends = [m for m in HARDWARE_BACKENDS if (modules / m).exists()]
    if not backends:
        others = sorted(p.name for p in modules.glob("kvm_*")) if modules.exists() else []
        return KvmProbe(False, f"{device} is backed by {', '.join(others) or 'no module'}, "
                               "not kvm_intel/kvm_amd: unmodified guests stall there")
    return KvmProbe(True, f"{device} works ({backends[0]})")
