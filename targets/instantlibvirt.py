"""Instant recovery on libvirt (``targets.instant``): the domain's disks are NBD disks on
UNIX sockets in the machine's folder, served by this process (``InstantServers``) from
the vault; once hydrated, a block copy and its pivot (``targets.instantcopy``, which
also finishes a copy a dead process left running in QEMU) move the running domain onto
local raw images, its stored definition follows, and the servers stop.

In the machine's folder, per disk ``NN-NAME``: ``NN-NAME.overlay/`` (the served disk's
overlay: what was fetched and what the guest wrote), ``NN-NAME.sock`` (its server's
socket, mode 0600, owned by the emulator's user), then ``NN-NAME.raw`` (the image the
pivot copies to). ``Recovered.details["instant"]`` lists them (JSON) and the resource
``instant:<vm>`` stands for the servers, which cleanup stops.
"""

from __future__ import annotations

import asyncio
import functools
import grp
import json
import os
import pwd
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from instant.overlay import IMAGE as OVERLAY_IMAGE
from targets.base import Recovered, TargetError
from targets.domainxml import NbdSource, disk_target, with_local_disks
from targets.instant import InstantSource
from targets.instantcopy import copy_onto
from targets.instantserve import InstantServers, InstantServersError, ServedDisk
from targets.virsh import Virsh

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
MAX_SOCKET_PATH = 107  # bytes in sun_path, less its terminating NUL


@dataclass(frozen=True)
class InstantLayout:
    name: str  # the point's disk
    dev: str  # the domain's target (vda …)
    overlay: Path
    socket: Path
    image: Path  # where the pivot copies the disk

    def doc(self) -> dict[str, str]:
        return {"name": self.name, "dev": self.dev, "overlay": str(self.overlay),
                "socket": str(self.socket), "image": str(self.image)}


def layout(folder: Path, disks: Sequence[str]) -> list[InstantLayout]:
    """Where each disk (the point's names, in the domain's order) goes in ``folder``."""
    out = []
    for i, name in enumerate(disks):
        stem = f"{i:02d}-{name}"
        out.append(InstantLayout(name, disk_target(i), folder / f"{stem}.overlay",
                                 folder / f"{stem}.sock", folder / f"{stem}.raw"))
    too_long = [str(x.socket) for x in out if len(os.fsencode(x.socket)) > MAX_SOCKET_PATH]
    if too_long:
        raise TargetError("spec_refused", f"socket path {too_long[0]} is longer than a UNIX "
                                          f"socket allows ({MAX_SOCKET_PATH} bytes)",
                          "choose a shorter libvirt image folder or machine name")
    return out


def of(recovered: Recovered) -> list[InstantLayout]:
    """The instant disks ``recovered`` was made with (none: not an instant recovery)."""
    docs = json.loads(recovered.details.get("instant") or "[]")
    return [InstantLayout(d["name"], d["dev"], Path(d["overlay"]), Path(d["socket"]),
                          Path(d["image"])) for d in docs]


def pivoted(recovered: Recovered) -> bool:
    return recovered.details.get("pivoted") == "yes"


async def start(servers: InstantServers, recovered: Recovered, disks: list[InstantLayout],
                source: InstantSource) -> list[Path | NbdSource]:
    """Serve ``disks`` for ``recovered`` (named on it first, so cleanup stops them);
    the domain's disk sources."""
    recovered.resources.append(f"instant:{recovered.vm_name}")
    recovered.details["instant"] = json.dumps([d.doc() for d in disks])
    recovered.details["point"] = source.point
    await serve(servers, recovered, source)
    return [NbdSource(d.socket) for d in disks]


async def serve(servers: InstantServers, recovered: Recovered, source: InstantSource
                ) -> None:
    disks = of(recovered)
    if not disks or pivoted(recovered):
        return
    try:
        await servers.serve(recovered.vm_name, source,
                            [ServedDisk(d.name, d.overlay, d.socket) for d in disks])
    except InstantServersError as e:
        raise TargetError("instant", str(e), "check the vault and its key (siterecovery "
                          "check), and the free space of the libvirt image folder") from e


async def hydrate(servers: InstantServers, recovered: Recovered, rate_mbps: float) -> None:
    if pivoted(recovered):
        return
    try:
        await servers.hydrate(recovered.vm_name, rate_mbps)
    except InstantServersError as e:
        raise TargetError("instant", str(e), "serve the disks first") from e


def progress(servers: InstantServers, recovered: Recovered) -> tuple[int, int]:
    if pivoted(recovered):
        return 1, 1
    try:
        return servers.progress(recovered.vm_name)
    except InstantServersError as e:
        raise TargetError("instant", str(e), "serve the disks first") from e


async def pivot(virsh: Virsh, servers: InstantServers, recovered: Recovered) -> Recovered:
    """Move the running domain onto local images (block copy from its NBD disks, then
    pivot: the guest keeps running and keeps what it wrote; a copy job left running by
    a process that died is found and finished, ``targets.instantcopy``), make its stored
    definition use them too, stop the servers and remove the overlays. A domain no
    longer running (its guest powered off) gets its hydrated overlays' images moved into
    place instead. The disks must be hydrated."""
    disks = of(recovered)
    name = recovered.vm_name
    if pivoted(recovered):
        return recovered
    running = (await virsh("domstate", name)).strip() in ("running", "paused")
    connected = functools.partial(servers.connected, name)
    copies = {d.dev: await copy_onto(virsh, name, d.dev, d.image, connected)
              for d in (disks if running else ())}
    await servers.stop(name)
    for d in disks if not running else ():
        # The guest stopped (powered off): no one writes any more, and a hydrated overlay's
        # image is the whole disk as the guest left it.
        held = d.overlay / OVERLAY_IMAGE
        if held.exists() or not d.image.exists():
            await asyncio.to_thread(os.replace, held, d.image)
    inactive = await virsh("dumpxml", "--inactive", name)
    await virsh.define("define", with_local_disks(inactive, {d.dev: d.image for d in disks}))
    for d in disks:
        await asyncio.to_thread(shutil.rmtree, d.overlay, True)
        d.socket.unlink(missing_ok=True)
    details = {**recovered.details, "pivoted": "yes",
               "pivot": "block copy" if running else "stopped machine: hydrated image moved"}
    if copies:
        details["block_copy"] = "; ".join(f"{dev}: {how}" for dev, how in copies.items())
    resources = [r for r in recovered.resources if r != f"instant:{name}"]
    resources += [f"file:{d.image}" for d in disks]
    return replace(recovered, resources=resources, details=details)


def emulator_owner(uri: str) -> tuple[int, int] | None:
    """The user and group QEMU runs as under ``uri`` (qemu.conf's ``user``/``group``,
    else Debian's libvirt-qemu), when this process (root) must hand the sockets to it;
    None when QEMU runs as this process's user or root."""
    if not uri.startswith("qemu:///system") or os.geteuid() != 0:
        return None
    conf = QEMU_CONF.read_text() if QEMU_CONF.is_file() else ""
    user = _setting(conf, "user") or "libvirt-qemu"
    group = _setting(conf, "group")
    try:
        pw = pwd.getpwnam(user.lstrip("+")) if not user.startswith("+") else \
            pwd.getpwuid(int(user[1:]))
    except (KeyError, ValueError):
        return None
    if pw.pw_uid == 0:
        return None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group[1:])).gr_gid if group.startswith("+") else \
                grp.getgrnam(group).gr_gid
        except (KeyError, ValueError):
            pass
    return pw.pw_uid, gid


def _setting(conf: str, key: str) -> str | None:
    m = re.search(rf'^\s*{key}\s*=\s*"([^"]*)"', conf, re.MULTILINE)
    return m.group(1) if m else None
