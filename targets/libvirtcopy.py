"""A running recovered domain's disks copied at one moment while it runs on: what a live
Re-protect reads, with nothing installed in the recovered machine and the guest never
paused.

``copy_running`` begins a push-mode backup (``virsh backup-begin``): QEMU copies every
disk of the domain, as it was when the backup began (one moment for all the disks, a
crash-consistent state, as a power cut then would leave), into a raw file in ``scratch``,
keeping the old data of what the guest overwrites meanwhile (copy-before-write). The
guest runs on throughout. The copies are then read as images at rest
(``targets.libvirtrest``) and removed (``drop``): they take as much space as the disks
(QEMU writes them whole), in the domain's own folder of the target's pool, made QEMU's
(its DAC label) so that it can create them.

A copy left by a run that was killed (its server killed with ``kill -9``) is found by
its scratch folder: the backup job still writing there is ended (``domjobabort``) and
the copy begun again. Another backup of the domain (another tool's) is left alone; the
copy then fails and names it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path
from xml.sax.saxutils import quoteattr

from targets.base import Recovered, TargetError
from targets.libvirtrest import images_of, state
from targets.virsh import Virsh, VirshError

POLL = 0.25  # seconds between looks at the backup job
SCRATCH = "live-copy"  # the folder of the copies, beside the domain's images
_JOB_TYPE = re.compile(r"^Job type:\s*(\S+)", re.MULTILINE)
_PROCESSED = re.compile(r"^(?:File|Data) processed:\s*([\d.]+)\s*(\S+)", re.MULTILINE)
_TOTAL = re.compile(r"^(?:File|Data) total:\s*([\d.]+)\s*(\S+)", re.MULTILINE)
_LABEL = re.compile(r"\+?(\d+):\+?(\d+)")  # a DAC label: uid:gid


def scratch_of(recovered: Recovered) -> Path:
    """Where the copies of ``recovered``'s disks are made: beside its images."""
    return images_of(recovered)[0][1].parent / SCRATCH


async def _layout(virsh: Virsh, name: str) -> tuple[dict[str, str], tuple[int, int] | None]:
    """Each disk image of the domain (its path) → its target device (``vda``); the uid
    and gid QEMU runs as (its DAC label; None: as root, unlabelled), who creates the
    copies."""
    root = ET.fromstring(await virsh("dumpxml", name))
    owner = None
    for sec in root.iter("seclabel"):
        label = sec.find("label")
        m = _LABEL.fullmatch(label.text.strip()) if (
            sec.get("model") == "dac" and label is not None and label.text) else None
        if m is not None:
            owner = int(m.group(1)), int(m.group(2))
    out: dict[str, str] = {}
    for disk in root.iter("disk"):
        source, target = disk.find("source"), disk.find("target")
        if source is not None and target is not None and source.get("file"):
            out[str(Path(str(source.get("file"))).resolve())] = str(target.get("dev"))
    return out, owner


async def _backup_target_folder(virsh: Virsh, name: str) -> str | None:
    """The folder a running push backup of the domain writes into (None: no backup)."""
    try:
        xml = await virsh("backup-dumpxml", name)
    except VirshError:
        return None
    for target in ET.fromstring(xml).iter("target"):
        if target.get("file"):
            return str(Path(str(target.get("file"))).parent)
    return ""  # a backup, not a push into files (a pull backup: another tool's)


async def end_stale(virsh: Virsh, recovered: Recovered) -> bool:
    """End a copy an earlier run left running (its target in our scratch folder);
    whether there was one."""
    name, scratch = recovered.vm_name, scratch_of(recovered)
    folder = await _backup_target_folder(virsh, name)
    if folder is None or Path(folder) != scratch:
        return False
    try:
        await virsh("domjobabort", name)
    except VirshError as e:
        if not e.missing:
            raise
    return True


def _size(number: str, unit: str) -> float:
    scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    return float(number) * scale.get(unit, 1)


async def _job(virsh: Virsh, name: str, *flags: str) -> str:
    return await virsh("domjobinfo", name, *flags)


async def copy_running(virsh: Virsh, recovered: Recovered, timeout: float,
                       progress: Callable[[float], Awaitable[None]] | None = None
                       ) -> list[tuple[str, Path]]:
    """Copy ``recovered``'s disks at one moment while its domain runs (see the module
    docstring); (disk name, copy) in the domain's order. ``progress`` gets the share done
    (0-100) as the copy goes. ``TargetError`` when the domain does not run, another
    backup of it is under way, the copy fails, or it takes longer than ``timeout``."""
    name = recovered.vm_name
    images = images_of(recovered)
    now = await state(virsh, name)
    if now != "running":
        raise TargetError("not_running", f"{name} is {now}: a live copy is made of a "
                                         "running domain",
                          "leave out live: a domain that does not run is read as it is")
    await end_stale(virsh, recovered)
    scratch = scratch_of(recovered)
    await asyncio.to_thread(shutil.rmtree, scratch, True)
    scratch.mkdir(mode=0o700)
    devices, owner = await _layout(virsh, name)
    if owner is not None:
        os.chown(scratch, *owner)
    copies: list[tuple[str, Path]] = []
    disks, used = [], set()
    for disk, image in images:
        dev = devices.get(str(image.resolve()))
        if dev is None:
            raise TargetError("not_readable", f"{name} does not use {image} any more",
                              "the recovered machine was changed by hand: fail over again")
        copy = scratch / image.name
        copies.append((disk, copy))
        used.add(dev)
        disks.append(f"<disk name={quoteattr(dev)} backup='yes' type='file'>"
                     f"<driver type='raw'/><target file={quoteattr(str(copy))}/></disk>")
    # the domain's other disks (a CD-ROM, a disk not recovered) are not copied
    disks += [f"<disk name={quoteattr(d)} backup='no'/>"
              for d in sorted(set(devices.values()) - used)]
    xml = f"<domainbackup mode='push'><disks>{''.join(disks)}</disks></domainbackup>"
    try:
        await _begin(virsh, name, xml)
        await _wait(virsh, name, timeout, progress)
    except BaseException:
        await end_stale(virsh, recovered)
        await asyncio.to_thread(shutil.rmtree, scratch, True)
        raise
    return copies


async def _begin(virsh: Virsh, name: str, xml: str) -> None:
    folder = await _backup_target_folder(virsh, name)
    if folder is not None:
        raise TargetError("busy", f"another backup of {name} is under way",
                          f"wait for it to end (virsh -c {virsh.uri} domjobinfo {name})")
    await virsh.with_xml(xml, "backup-begin", name, "--backupxml")


async def _wait(virsh: Virsh, name: str, timeout: float,
                progress: Callable[[float], Awaitable[None]] | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = await _job(virsh, name)
        kind = _JOB_TYPE.search(info)
        if kind is None or kind.group(1) == "None":
            break
        done, total = _PROCESSED.search(info), _TOTAL.search(info)
        if progress is not None and done is not None and total is not None:
            whole = _size(*total.groups())
            if whole > 0:
                await progress(min(100.0, 100.0 * _size(*done.groups()) / whole))
        if time.monotonic() > deadline:
            raise TargetError("timeout", f"the live copy of {name}'s disks did not end "
                                         f"within {timeout:g} s",
                              "give it more time, or read the domain paused (pause)")
        await asyncio.sleep(POLL)
    info = await _job(virsh, name, "--completed")
    kind = _JOB_TYPE.search(info)
    if kind is None or kind.group(1) != "Completed":
        raise TargetError("copy_failed", f"the live copy of {name}'s disks failed: "
                                         f"{info.strip() or 'no job record'}",
                          "see libvirtd's log for the domain")


async def drop(recovered: Recovered) -> None:
    """Remove the copies (after they were read, or after a failure)."""
    await asyncio.to_thread(shutil.rmtree, scratch_of(recovered), True)
