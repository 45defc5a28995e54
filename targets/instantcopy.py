"""Moving a running libvirt domain's disk from its NBD server onto a local image: a
``virsh blockcopy`` (a mirror block job in QEMU), then its pivot.

The block job lives in QEMU, not in this process: if this process dies while it runs,
the job goes on (or ends with an error, when its reads from the dead server fail), and
the pivot never comes. ``copy_onto`` therefore looks first: the disk already on the
image (a pivot done before a restart) is left as it is; a copy job found running is
waited for and pivoted (``instant_block_copy_found``); one that ends before it is ready,
or that makes no progress for ``STALL_SECONDS``, is aborted and started again, up to
``COPY_ATTEMPTS`` copies. Before each, QEMU is given up to ``RECONNECT_SECONDS`` to
reconnect to the disk's server (after a restart its NBD client retries on its own
schedule, and a copy started before it has reconnected fails at its first read). The
job's state is libvirt's: the ``<mirror>`` of the disk in the live domain XML
(``ready='yes'`` once the copy has caught up) and ``virsh blockjob --info --raw`` (its
position).
"""

from __future__ import annotations

import asyncio
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from targets.base import TargetError
from targets.virsh import Virsh, VirshError

log = structlog.get_logger("targets.instant")

COPY_POLL_SECONDS = 0.5  # how often a copy job's state is read while waiting for it
STALL_SECONDS = 300.0  # a copy whose position has not moved this long is started again
COPY_ATTEMPTS = 3  # copies started (or found) before the pivot is given up
RECONNECT_SECONDS = 60.0  # for QEMU to reconnect to a restarted server (retries ≤ 16 s apart)

# how copy_onto got the disk onto its image (Recovered.details["block_copy"])
COPIED = "copied"
FOUND = "a copy found running in QEMU, waited for"
AGAIN = "copied again (the copy had ended before it was ready)"
ALREADY = "already on its image"


@dataclass(frozen=True)
class Mirror:
    """A copy job of a disk, as the live domain XML shows it."""

    dest: str | None  # the image it copies to
    ready: str | None  # None: copying; "yes": caught up; "abort"/"pivot": ending


async def mirror_of(virsh: Virsh, name: str, dev: str) -> Mirror | None:
    """The copy job of disk ``dev`` of running domain ``name``, if it has one."""
    for disk in ET.fromstring(await virsh("dumpxml", name)).findall("devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") != dev:
            continue
        mirror = disk.find("mirror")
        if mirror is None:
            return None
        source = mirror.find("source")
        dest = mirror.get("file") or (source.get("file") if source is not None else None)
        return Mirror(dest, mirror.get("ready"))
    return None


async def position(virsh: Virsh, name: str, dev: str) -> tuple[int, int] | None:
    """(bytes copied, of bytes) of ``dev``'s block job; None without one (or when
    libvirt cannot tell: the job just ended)."""
    try:
        out = await virsh("blockjob", name, dev, "--info", "--raw")
    except VirshError as e:
        log.info("instant_block_copy_position_unknown", machine=name, disk=dev,
                 error=e.message)
        return None
    cur, end = re.search(r"cur=(\d+)", out), re.search(r"end=(\d+)", out)
    return (int(cur[1]), int(end[1])) if cur and end else None


async def source_of(virsh: Virsh, name: str, dev: str) -> str | None:
    """The source ``virsh domblklist --details`` shows for target ``dev``."""
    for line in (await virsh("domblklist", name, "--details")).splitlines():
        cols = line.split(None, 3)
        if len(cols) == 4 and cols[2] == dev:
            return cols[3].strip()
    return None


async def copy_onto(virsh: Virsh, name: str, dev: str, image: Path,
                    connected: Callable[[float], Awaitable[bool]]) -> str:
    """Move disk ``dev`` of running domain ``name`` onto ``image`` (a raw file the copy
    makes) without stopping the guest; resumes a copy job this process or an earlier
    one started. ``connected(timeout)`` waits for QEMU to be connected to the disk's
    server. Returns how (``COPIED``, ``FOUND``, ``AGAIN``, ``ALREADY``)."""
    how = COPIED
    for attempt in range(1, COPY_ATTEMPTS + 1):
        if await source_of(virsh, name, dev) == str(image):
            return ALREADY if attempt == 1 else how
        if not await connected(RECONNECT_SECONDS):
            log.warning("instant_nbd_not_reconnected", machine=name, disk=dev,
                        waited=RECONNECT_SECONDS)
        mirror = await mirror_of(virsh, name, dev)
        if mirror is not None and mirror.dest != str(image):
            log.warning("instant_block_copy_foreign", machine=name, disk=dev,
                        dest=mirror.dest)
            await _abort(virsh, name, dev)
            mirror = None
        if mirror is None:
            image.unlink(missing_ok=True)  # an ended copy's: blockcopy makes it
            # --transient-job: the copy need not outlive the domain (libvirt refuses a
            # persistent domain's copy otherwise); what a restart must see is redefined
            # by the caller
            await virsh("blockcopy", name, dev, "--dest", str(image), "--format", "raw",
                        "--transient-job")
            log.info("instant_block_copy_started", machine=name, disk=dev,
                     image=str(image), attempt=attempt)
        else:
            how = FOUND
            log.info("instant_block_copy_found", machine=name, disk=dev, image=str(image),
                     ready=mirror.ready or "no")
        if await _until_ready(virsh, name, dev):
            await virsh("blockjob", name, dev, "--pivot")
            log.info("instant_block_copy_pivoted", machine=name, disk=dev, image=str(image))
            return how
        if await source_of(virsh, name, dev) == str(image):
            return how  # a pivot asked before a restart finished meanwhile
        how = AGAIN
        log.warning("instant_block_copy_ended", machine=name, disk=dev, attempt=attempt)
    raise TargetError("instant", f"the copy of disk {dev} of {name} onto {image} ended "
                      f"before it was ready, {COPY_ATTEMPTS} times",
                      "check the free space of the libvirt image folder and the domain's "
                      f"QEMU log (/var/log/libvirt/qemu/{name}.log), then run the job again")


async def _until_ready(virsh: Virsh, name: str, dev: str) -> bool:
    """Wait until ``dev``'s copy job is ready (True) or has ended (False); a job that
    makes no progress for ``STALL_SECONDS`` is aborted (False)."""
    last: tuple[int, int] | None = None
    moved = time.monotonic()
    while True:
        mirror = await mirror_of(virsh, name, dev)
        if mirror is None:
            return False
        if mirror.ready == "yes":
            return True
        if mirror.ready is None:  # copying ("abort", "pivot": ending; wait for it)
            now = await position(virsh, name, dev)
            if now != last:
                last, moved = now, time.monotonic()
            elif time.monotonic() - moved > STALL_SECONDS:
                log.warning("instant_block_copy_stalled", machine=name, disk=dev,
                            position=now)
                await _abort(virsh, name, dev)
                return False
        await asyncio.sleep(COPY_POLL_SECONDS)


async def _abort(virsh: Virsh, name: str, dev: str) -> None:
    """End ``dev``'s copy job (waits for QEMU to end it); none: nothing."""
    try:
        await virsh("blockjob", name, dev, "--abort")
    except VirshError as e:
        if "no current block job" not in e.output.lower() and not e.missing:
            raise
