"""A point of the recovered machine, taken from its disks on the target (the folder
target's raw images; a libvirt domain's raw images while it is shut off,
``targets.libvirtrest``): what Re-protect and Failback write into the vault, without an
agent inside the recovered machine.

The base is the machine's newest point the vault holds of this recovery: the last one
Re-protect took, else the failover point (the recovered machine started from it), so
only the blocks written since are stored (``vault/imagepoint.py``). Once a commit
deleted the failover's points there is no base and the disks are stored whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from configserver.jobdefs import StepFailed
from configserver.jobs import StepContext
from configserver.recoverysteps import LOCK_WAIT_SECONDS, FailoverDeps, open_vault
from targets.base import Recovered, TargetError
from targets.libvirt import LibvirtTarget
from vault.errors import MissingObjectError, VaultError
from vault.imagepoint import ImageDisk, ImagePoint, point_from_images
from vault.locks import LockedError, locked
from vault.point import Point

READABLE = {"folder", "libvirt"}  # targets whose recovered disks are read from the host
LIVE_COPY_SECONDS = 6 * 3600.0  # the longest a live copy of a running domain's disks may take


async def recovered_disks(deps: FailoverDeps, rec: dict[str, Any],
                          shutdown_timeout: float | None = None, paused_ok: bool = False
                          ) -> list[ImageDisk]:
    """The recovered machine's raw images of the item's failover record ``rec``, on any
    target read from the host: a libvirt domain's only once it is shut off (asked to
    shut down first when ``shutdown_timeout`` is given; a running one is refused unless
    ``paused_ok``: it is read paused, ``paused_for_read``); StepFailed naming what is
    missing and what to do."""
    if (rec.get("recovered") or {}).get("target") != "libvirt":
        return recovered_images(rec)
    target, recovered = _libvirt(deps, rec)
    try:
        got = await target.disks_at_rest(recovered, shutdown_timeout, paused_ok)
    except TargetError as e:
        raise StepFailed(f"{e.message}: {e.hint}" if e.hint else e.message) from None
    return [ImageDisk(name, str(path)) for name, path in got]


def _libvirt(deps: FailoverDeps, rec: dict[str, Any]) -> tuple[LibvirtTarget, Recovered]:
    target = deps.targets.get("libvirt")
    if not isinstance(target, LibvirtTarget):
        raise StepFailed("the recovered machine is on the libvirt target, which this "
                         "configuration server does not have (set libvirt_uri)")
    return target, Recovered(**rec["recovered"])


@asynccontextmanager
async def paused_for_read(deps: FailoverDeps, rec: dict[str, Any], ours: bool
                          ) -> AsyncIterator[bool]:
    """Hold a running libvirt domain paused while the body reads its images
    (``targets.libvirtrest``: a crash-consistent state); yields whether it is held
    paused. ``ours``: an earlier run of the same step paused it (its server was killed
    meanwhile): it is resumed after the read too. Other targets: nothing to hold."""
    if (rec.get("recovered") or {}).get("target") != "libvirt":
        yield False
        return
    target, recovered = _libvirt(deps, rec)
    try:
        paused = await target.pause_for_read(recovered) or ours
    except TargetError as e:
        raise StepFailed(f"cannot pause {recovered.vm_name} for the read: {e.message}") \
            from None
    try:
        yield paused
    finally:
        if paused:
            await target.resume(recovered)


@asynccontextmanager
async def live_copies(deps: FailoverDeps, rec: dict[str, Any], ctx: StepContext
                      ) -> AsyncIterator[list[ImageDisk] | None]:
    """Copies of a running libvirt domain's disks made at one moment while it runs on
    (``targets.libvirtcopy``), for the body to read; removed after it. None where there
    is nothing to copy (not on libvirt, or the domain does not run: read it at rest)."""
    if (rec.get("recovered") or {}).get("target") != "libvirt":
        yield None
        return
    target, recovered = _libvirt(deps, rec)

    async def progress(share: float) -> None:  # the copy is the first half of the step
        await ctx.progress(round(share / 2, 1), "copying the running machine's disks")

    try:
        got = (await target.copy_running(recovered, LIVE_COPY_SECONDS, progress)
               if await target.running(recovered) else None)
    except TargetError as e:
        raise StepFailed(f"cannot copy {recovered.vm_name}'s disks while it runs: "
                         f"{e.message}" + (f" ({e.hint})" if e.hint else "")) from None
    if got is None:
        yield None
        return
    try:
        yield [ImageDisk(name, str(path)) for name, path in got]
    finally:
        await target.drop_copies(recovered)


def recovered_images(rec: dict[str, Any]) -> list[ImageDisk]:
    """The recovered machine's raw images (from the folder target's ``vm.json``) of the
    item's failover record ``rec``; StepFailed naming what is missing."""
    recovered = rec.get("recovered") or {}
    target = recovered.get("target")
    if target != "folder":
        raise StepFailed(f"the recovered machine's disks are read from the folder or the "
                         f"libvirt target; this one is on {target or 'no target'!r}, "
                         "which is not read yet")
    folders = [r.split(":", 1)[1] for r in recovered.get("resources", [])
               if r.startswith("folder:")]
    if not folders:
        raise StepFailed("the recovered machine has no folder on the folder target")
    folder = Path(folders[0])
    try:
        vm = json.loads((folder / "vm.json").read_text())
    except (OSError, ValueError) as e:
        raise StepFailed(f"cannot read {folder / 'vm.json'}: {e}") from None
    disks = vm.get("disks") or []
    odd = [d.get("name") for d in disks if d.get("format") != "raw"]
    if odd:
        raise StepFailed(f"disks {', '.join(map(str, odd))} of the recovered machine are not "
                         "raw images: only raw images are read (folder_format = raw)")
    return [ImageDisk(str(d["name"]), str(folder / d["file"])) for d in disks]


async def take_point(ctx: StepContext, rec: dict[str, Any], purpose: str,
                     images: list[ImageDisk]) -> tuple[ImagePoint, Point | None]:
    """Write the recovered machine's disks ``images`` into the vault as a point of the
    item's machine (its cycle derived from the job and ``purpose``, so a step run again
    finds the same point); the point and the base it is a delta on (None: whole)."""
    base_id = (rec.get("reprotect") or {}).get("last_point") or rec.get("point")
    cycle = hashlib.sha256(f"{purpose}:{ctx.job.id}".encode()).hexdigest()[:32]
    vault = await open_vault(ctx)
    try:
        async with locked(vault, "shared", f"{purpose} of {ctx.target}",
                          wait=LOCK_WAIT_SECONDS):
            try:
                base = await vault.read_point(str(base_id)) if base_id else None
            except MissingObjectError:
                base = None  # committed: the failover's points are gone
            bs = base.disks[0].block_size if base is not None else vault.config.block_size
            with ThreadPoolExecutor(2) as ex:
                made = await point_from_images(vault, ex, machine=ctx.target, cycle=cycle,
                                               disks=images, block_size=bs, base=base)
    except (LockedError, VaultError, OSError) as e:
        raise StepFailed(f"cannot write the recovered machine's disks into the vault: "
                         f"{e}") from None
    finally:
        await vault.close()
    return made, None if made.full else base
