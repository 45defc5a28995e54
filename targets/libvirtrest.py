"""A recovered libvirt domain's disks at rest: what Re-protect and Failback read on the
host, with nothing installed in the recovered machine.

The images ``create`` copied (``<pool_dir>/<vm_name>/NN-<disk>.raw``, named on
``Recovered.resources``) are read only while the domain is shut off: a shut-off
machine's images are one consistent state, written by a guest that flushed them on its
way down. ``disks_at_rest`` refuses a running (or paused) domain; with a
``shutdown_timeout`` it first asks the guest to shut down (``virsh shutdown``: an ACPI
power button the guest must answer) and waits for it to be shut off — what a planned
failback does. A domain on disks served over NBD (an instant recovery not yet moved
onto local images) has no image to read and is refused.

A re-protect may instead read a running domain *paused* (``pause_for_read``, then
``resume``): when QEMU stops a domain's vCPUs it drains and flushes its I/O, so the
images then hold every write the guest completed and nothing after — a crash-consistent
state, as a power cut at that moment would leave. The guest stands still for the read
(the whole of every disk is read and compared).
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from targets.base import Recovered, TargetError
from targets.virsh import Virsh

AT_REST = "shut off"
POLL = 0.5  # seconds between looks at a domain that was asked to shut down
_IMAGE = re.compile(r"^\d{2}-(?P<disk>.+)\.raw$")


def images_of(recovered: Recovered) -> list[tuple[str, Path]]:
    """(disk name, raw image) of each disk of ``recovered``, in the domain's order."""
    out = []
    for res in recovered.resources:
        kind, _, what = res.partition(":")
        m = _IMAGE.match(Path(what).name) if kind == "file" else None
        if m is not None:
            out.append((m.group("disk"), Path(what)))
    if not out:
        how = ("its disks are served over NBD (an instant recovery not yet moved onto "
               "local images)" if any(r.startswith("instant:") for r in recovered.resources)
               else "it names no disk image")
        raise TargetError("not_readable", f"{recovered.vm_name}: {how}",
                          "move the instant recovery onto local images first")
    return out


async def state(virsh: Virsh, name: str) -> str:
    return (await virsh("domstate", name)).strip()


async def disks_at_rest(virsh: Virsh, recovered: Recovered,
                        shutdown_timeout: float | None, paused_ok: bool = False
                        ) -> list[tuple[str, Path]]:
    """The images of ``recovered`` once its domain is shut off (see the module
    docstring); ``TargetError`` naming the domain's state and what to do otherwise.
    ``paused_ok``: a running or paused domain is accepted too (it will be read paused)."""
    images = images_of(recovered)
    name = recovered.vm_name
    now = await state(virsh, name)
    if paused_ok and now in ("running", "paused"):
        now = AT_REST
    if now != AT_REST and shutdown_timeout is not None:
        if now == "running":
            await virsh.gone("shutdown", name)
        deadline = time.monotonic() + shutdown_timeout
        while now != AT_REST and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
            now = await state(virsh, name)
        if now != AT_REST:
            raise TargetError(
                "not_shut_down", f"{name} is {now}, not shut off, {shutdown_timeout:g} s "
                "after it was asked to shut down",
                f"shut it down from inside the machine (or virsh -c {virsh.uri} "
                f"shutdown {name}), then run this again")
    if now != AT_REST:
        raise TargetError(
            "running", f"{name} is {now}: its disks are read from the host only while it "
                       "is shut off",
            f"shut it down (virsh -c {virsh.uri} shutdown {name}), then run this again; "
            "a re-protect may read it paused instead (pause)")
    missing = [str(p) for _, p in images if not p.is_file()]
    if missing:
        raise TargetError("not_readable", f"{name}: image(s) {', '.join(missing)} are gone",
                          "the recovered machine was removed by hand: fail over again")
    return images


async def pause_for_read(virsh: Virsh, recovered: Recovered) -> bool:
    """Pause ``recovered``'s domain if it runs (see the module docstring); whether this
    call paused it."""
    if await state(virsh, recovered.vm_name) != "running":
        return False
    await virsh("suspend", recovered.vm_name)
    return True


async def resume(virsh: Virsh, recovered: Recovered) -> None:
    """Let a domain paused for a read run on (one no longer paused is left as it is)."""
    if await state(virsh, recovered.vm_name) == "paused":
        await virsh("resume", recovered.vm_name)
