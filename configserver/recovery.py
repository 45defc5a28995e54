"""Recovery settings of a replicated item ("compute and network", as ASR calls them):
where and how its machine is recovered — the target, the recovered VM's name, CPUs and
memory (or an Azure size), the networks for failover and for drills, a static address or
DHCP, the MAC, the boot marker, the firmware, which disks.

``RecoverySettings`` is the one place the settings, their defaults and their rules live.
The catalog keeps only what an operator set (``replicated_items.recovery``); every other
setting is its default, so a default changed later applies to items that never set it.
``apply`` validates a change and raises ``InvalidRequest`` whose message names the setting,
the value given and the values allowed. A target's own requirements (disk count, size
names …) are checked by the target (``targets.base.Target.check``) before a recovery.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from common.names import DISK_PATTERN, NAME_PATTERN, is_disk_name, is_name
from configserver.errors import InvalidRequest
from configserver.schema import array, nullable, obj
from targets.base import RecoverySpec

TARGETS = ("folder", "libvirt", "azure")
FIRMWARES = ("bios", "uefi")
MAX_CPUS = 128
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 128, 4 * 1024 * 1024
MAX_MARKER = 200
MAC_PATTERN = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"
AZURE_SIZE_PATTERN = r"^Standard_[A-Za-z0-9_]{1,60}$"
_MAC, _AZURE_SIZE = re.compile(MAC_PATTERN), re.compile(AZURE_SIZE_PATTERN)


@dataclass(frozen=True)
class RecoverySettings:
    """An item's recovery settings; ``None`` means "the default the target chooses"."""

    target: str = "folder"
    vm_name: str | None = None  # None: the protected machine's name
    cpus: int = 1
    memory_mib: int = 1024
    azure_size: str | None = None  # azure target: the VM size (None: sized from cpus/memory)
    network: str | None = None  # failover network (None: the target's default)
    drill_network: str | None = None  # test failover network (None: the target's isolated one)
    ip: str | None = None  # static address, optionally with a prefix length (None: DHCP)
    mac: str | None = None  # None: the target makes one up
    boot_marker: str | None = None  # console text that proves a boot (None: a login prompt)
    firmware: str = "bios"
    disks: tuple[str, ...] = ()  # the disks to recover, in order (empty: every disk)

    @classmethod
    def stored(cls, doc: dict[str, Any] | None) -> RecoverySettings:
        """The settings the catalog holds (what ``changed()`` gave, written by ``apply``)."""
        doc = dict(doc or {})
        if "disks" in doc:
            doc["disks"] = tuple(doc["disks"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def changed(self) -> dict[str, Any]:
        """Only what differs from the defaults: what the catalog keeps."""
        default = RecoverySettings()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if v != getattr(default, k)}

    def doc(self, machine: str) -> dict[str, Any]:
        """The API view: every setting, the VM name resolved."""
        out = asdict(self)
        out["disks"] = list(self.disks)
        out["vm_name"] = self.vm_name or machine
        return out

    def spec(self, machine: str, point: str, *, drill: bool, network: str | None = None
             ) -> RecoverySpec:
        """What a target gets for recovering ``point`` of ``machine``. A drill goes to the
        drill network (never the failover one); ``network`` overrides either for this run."""
        return RecoverySpec(
            machine=machine, vm_name=self.vm_name or machine, cpus=self.cpus,
            memory_mib=self.memory_mib, drill=drill,
            network=network or (self.drill_network if drill else self.network),
            ip=self.ip, mac=self.mac, boot_marker=self.boot_marker, firmware=self.firmware,
            point=point, azure_size=self.azure_size)


def _refuse(setting: str, value: Any, allowed: str) -> InvalidRequest:
    return InvalidRequest("recovery_setting_invalid",
                          f"recovery setting {setting}: {value!r} is not allowed; allowed: "
                          f"{allowed}",
                          f"siterecovery failover settings MACHINE --{setting.replace('_', '-')}"
                          " VALUE")


def _int(setting: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _refuse(setting, v, f"a whole number from {lo} to {hi}")
    return v


def _choice(setting: str, v: Any, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        raise _refuse(setting, v, " | ".join(allowed))
    return str(v)


def _optional_name(setting: str, v: Any) -> str | None:
    if v is not None and not is_name(v):
        raise _refuse(setting, v, "a name of 1-63 letters, digits, '.', '_' or '-' starting "
                                  "with a letter or digit, or null for the default")
    return v


def _ip(v: Any) -> str | None:
    if v is None or v == "dhcp":
        return None
    try:
        return str(ipaddress.ip_interface(v)) if "/" in str(v) else \
            str(ipaddress.ip_address(v))
    except ValueError:
        raise _refuse("ip", v, "an IPv4 or IPv6 address (192.0.2.10 or 192.0.2.10/24), or "
                               "'dhcp' / null for DHCP") from None


def _mac(v: Any) -> str | None:
    if v is None:
        return None
    text = str(v).lower().replace("-", ":")
    if not _MAC.fullmatch(text) or int(text[:2], 16) & 1:
        raise _refuse("mac", v, "a unicast MAC address like 52:54:00:12:34:56 (the first "
                                "octet even), or null to let the target choose")
    return text


def _marker(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= MAX_MARKER or not v.isprintable():
        raise _refuse("boot_marker", v, f"1-{MAX_MARKER} printable characters, or null for a "
                                        "login prompt")
    return v


def _azure_size(v: Any) -> str | None:
    if v is not None and not (isinstance(v, str) and _AZURE_SIZE.fullmatch(v)):
        raise _refuse("azure_size", v, "an Azure VM size like Standard_D2s_v5, or null")
    return v


def _disks(v: Any, known: list[str]) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(is_disk_name(d) for d in v) or len(set(v)) != len(v):
        raise _refuse("disks", v, "a list of distinct disk names of the machine, or [] for "
                                  "every disk")
    unknown = [d for d in v if known and d not in known]
    if unknown:
        raise _refuse("disks", v, f"disks of the machine: {', '.join(known)} ([] for all)")
    return tuple(v)


def apply(current: RecoverySettings, change: dict[str, Any], machine_disks: list[str]
          ) -> RecoverySettings:
    """``current`` with ``change`` applied; a null value resets a setting to its default.
    ``machine_disks`` (the machine's inventory; empty when unknown) bounds ``disks``.
    Raises ``InvalidRequest`` (code ``recovery_setting_invalid``) naming the first setting
    refused, the value given and the values allowed."""
    default = RecoverySettings()
    out: dict[str, Any] = {}
    for key, v in change.items():
        if key not in {f.name for f in fields(RecoverySettings)}:
            raise _refuse(key, v, "one of " + ", ".join(f.name for f in fields(RecoverySettings)))
        if v is None and key in ("target", "cpus", "memory_mib", "firmware"):
            out[key] = getattr(default, key)
            continue
        match key:
            case "target":
                out[key] = _choice(key, v, TARGETS)
            case "firmware":
                out[key] = _choice(key, v, FIRMWARES)
            case "cpus":
                out[key] = _int(key, v, 1, MAX_CPUS)
            case "memory_mib":
                out[key] = _int(key, v, MIN_MEMORY_MIB, MAX_MEMORY_MIB)
            case "vm_name" | "network" | "drill_network":
                out[key] = _optional_name(key, v)
            case "ip":
                out[key] = _ip(v)
            case "mac":
                out[key] = _mac(v)
            case "boot_marker":
                out[key] = _marker(v)
            case "azure_size":
                out[key] = _azure_size(v)
            case "disks":
                out[key] = _disks(v, machine_disks)
    return replace(current, **out)


_OPT_NAME = nullable({"type": "string", "pattern": NAME_PATTERN})
RECOVERY = obj({
    "target": {"enum": list(TARGETS)},
    "vm_name": {"type": "string", "pattern": NAME_PATTERN},
    "cpus": {"type": "integer", "minimum": 1, "maximum": MAX_CPUS},
    "memory_mib": {"type": "integer", "minimum": MIN_MEMORY_MIB, "maximum": MAX_MEMORY_MIB},
    "azure_size": nullable({"type": "string", "pattern": AZURE_SIZE_PATTERN}),
    "network": _OPT_NAME, "drill_network": _OPT_NAME,
    "ip": nullable({"type": "string"}),
    "mac": nullable({"type": "string"}),
    "boot_marker": nullable({"type": "string", "maxLength": MAX_MARKER}),
    "firmware": {"enum": list(FIRMWARES)},
    "disks": array({"type": "string", "pattern": DISK_PATTERN}),
}, [f.name for f in fields(RecoverySettings)])
# A change: any subset, each value also null (back to the default). Values are checked by
# ``apply`` (so that the refusal names the allowed values), not by the schema.
RECOVERY_CHANGE = obj({f.name: {} for f in fields(RecoverySettings)})
