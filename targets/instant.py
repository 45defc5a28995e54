"""Instant recovery on a target: the machine boots on disks served over NBD straight from
the vault, then moves onto local images without a reboot.

A target that can (libvirt) implements ``InstantTarget`` besides ``Target``. The caller
(a failover job) drives it in this order:

1. ``create_instant(spec, disks, source)``: the target starts serving each disk of the
   point (``targets.instantserve``) and defines the machine on those NBD disks; returns a
   ``Recovered`` naming everything made (the servers too), as ``create`` does;
2. ``serve_instant(recovered, source)`` before each later step: serves the disks again
   if this process restarted since (it resumes from their overlays), else nothing;
3. ``nbd_sockets(recovered)``: where to read each disk through the same server (the
   disk checks), then ``boot`` as for any recovery;
4. ``hydrate_instant(recovered, rate_mbps)``: copies every block not local yet from the
   vault, at that rate (``instant_progress`` tells how far it is);
5. ``pivot_instant(recovered)``: moves the running machine onto local images (no reboot),
   stops the servers and removes their overlays; returns the ``Recovered`` as it is now.

``cleanup`` removes an instant recovery's machine as any other, servers included. A
target without ``create_instant`` refuses instant recovery (``supports_instant``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from targets.base import Recovered, RecoverySpec, Target
from vault.repo import Vault

INSTANT_TARGETS = ("libvirt",)  # the target kinds that implement InstantTarget


@dataclass(frozen=True)
class InstantDisk:
    """One disk of the point, served as the recovered machine's disk."""

    name: str  # the protected machine's disk name
    size: int  # bytes


@dataclass(frozen=True)
class InstantSource:
    """Where served disks come from: a vault (opened by the caller's means, closed by the
    server when it stops) and a recovery point in it."""

    open_vault: Callable[[], Awaitable[Vault]]
    point: str  # the point's id


@runtime_checkable
class InstantTarget(Target, Protocol):
    async def create_instant(self, spec: RecoverySpec, disks: list[InstantDisk],
                             source: InstantSource) -> Recovered: ...

    async def serve_instant(self, recovered: Recovered, source: InstantSource) -> None: ...

    def nbd_sockets(self, recovered: Recovered) -> dict[str, Path]: ...

    async def hydrate_instant(self, recovered: Recovered, rate_mbps: float) -> None: ...

    def instant_progress(self, recovered: Recovered) -> tuple[int, int]: ...

    async def pivot_instant(self, recovered: Recovered) -> Recovered: ...


def supports_instant(target: Target) -> bool:
    return isinstance(target, InstantTarget)


def refusal(target_kind: str) -> str:
    """Why ``target_kind`` refuses an instant recovery, and what to do."""
    return (f"the {target_kind} target cannot do instant recovery (it needs a machine that "
            f"can boot on a disk served over NBD: {', '.join(INSTANT_TARGETS)}); run the "
            "recovery without --instant, or change the item's target")
