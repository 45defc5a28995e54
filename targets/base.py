"""The interface every failover target implements, and the errors it raises.

A recovery runs in this order (the caller — a failover job or a CLI verb — drives it):

1. ``check(spec, disks)``: the target's requirements (disk count and sizes, names,
   sizes of the VM); returns every refusal, each naming the setting and what is
   allowed. Nothing is created.
2. the caller restores the point's disks (``vault.restore.restore_point``) into
   raw images in a work folder and checks them (``targets.verify``);
3. ``create(spec, disks)``: the target takes the images (copy, import or upload)
   and defines the machine. Returns a ``Recovered`` naming every resource it made.
   If it fails part way, what it had made is still named on the error
   (``TargetError.recovered``) so cleanup can remove it. Before it runs, the caller
   records ``planned(spec, disks)``: everything it may make, so that what a create
   interrupted without a word (the process killed, the job cancelled) made can be
   cleaned up too. A create run again for the same recovery after such an
   interruption continues or replaces what the first one began;
4. ``boot(recovered, timeout)``: starts the machine and waits for proof that it
   booted; raises ``BootFailedError`` with the console's last lines. A target that
   cannot boot machines (folder, azure without credentials) returns ``None``;
5. ``cleanup(recovered)``: removes everything ``create`` made. Idempotent: a
   resource already gone is not an error, so an interrupted cleanup can run again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class RecoveryDisk:
    """One disk of the recovered machine, as a raw image the caller restored."""

    name: str  # the protected machine's disk name (sda, vdb, disk0 …)
    path: Path  # the raw image
    size: int  # bytes


@dataclass(frozen=True)
class RecoverySpec:
    """The recovered machine, from the item's recovery settings."""

    machine: str  # the protected machine's name
    vm_name: str  # the recovered machine's name on the target
    cpus: int = 1
    memory_mib: int = 512
    drill: bool = False  # a test failover: attach to the isolated drill network
    network: str | None = None  # the target's network for this recovery (None: default)
    ip: str | None = None  # static address (None: DHCP)
    mac: str | None = None
    boot_marker: str | None = None  # console text that proves a boot (None: a login prompt)
    firmware: str = "bios"  # bios | uefi (a target that reads the disk's own may differ)
    azure_size: str | None = None  # azure: the VM size (None: the target's, or from cpus/memory)
    point: str | None = None  # the recovery point's id, for targets that record it


@dataclass
class Recovered:
    """What a target made for one recovery: enough to boot it and to clean it up."""

    target: str
    vm_name: str
    resources: list[str] = field(default_factory=list)  # "domain:x", "file:/p", "blob:c/n"
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BootProof:
    seconds: float  # from start to the proof on the console
    matched: str  # the console line that proved it
    console_tail: list[str]


class TargetError(Exception):
    """A target could not do what was asked. ``code`` is stable, ``hint`` says what to do."""

    def __init__(self, code: str, message: str, hint: str = "",
                 recovered: Recovered | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.hint, self.recovered = code, message, hint, recovered


class BootFailedError(TargetError):
    """The machine did not show proof of a boot in time; ``console_tail`` says why."""

    def __init__(self, message: str, console_tail: list[str]) -> None:
        super().__init__("boot_failed", message,
                         "read the console lines; check the boot loader and the disk order")
        self.console_tail = console_tail


@dataclass(frozen=True)
class Refusal:
    """A recovery setting the target cannot accept."""

    setting: str
    message: str  # names the value given and the values allowed


class Target(Protocol):
    name: str

    async def check(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> list[Refusal]: ...

    def planned(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> Recovered:
        """Everything ``create(spec, disks)`` may make, named before it runs; makes
        nothing. ``cleanup`` of it removes what an interrupted ``create`` left (what is
        not there is skipped)."""
        ...

    async def create(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> Recovered: ...

    async def boot(self, recovered: Recovered, timeout: float) -> BootProof | None: ...

    async def cleanup(self, recovered: Recovered) -> None: ...

    async def close(self) -> None:
        """Let go of what the target holds (clients, servers) when its daemon stops."""
        ...
