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
                        shutdown_timeout: float | None) -> list[tuple[str, Path]]:
    """The images of ``recovered`` once its domain is shut off (see the module
    docstring); ``TargetError`` naming the domain's state and what to do otherwise."""
    images = images_of(recovered)
    name = recovered.vm_name
    now = await state(virsh, name)
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
            f"shut it down (virsh -c {virsh.uri} shutdown {name}), then run this again")
    missing = [str(p) for _, p in images if not p.is_file()]
    if missing:
        raise TargetError("not_readable", f"{name}: image(s) {', '.join(missing)} are gone",
                          "the recovered machine was removed by hand: fail over again")
    return images
