"""QEMU dirty bitmaps through libvirt: a VM's disks protected from its host.

With ``snapshot = "libvirt"`` the agent runs on the KVM/QEMU host and protects the
disks of one running domain (``libvirt_domain``; each disk of ``disks`` named by its
target, ``vda``, its ``path`` the image libvirt shows). No agent runs in the guest.

Each cycle's hold (``LibvirtBackup.hold``) begins a pull-mode backup (``virsh
backup-begin``) that creates a new checkpoint (``siterecovery-<id>``: a persistent
dirty bitmap in each qcow2 image) and exports every protected disk, as it was at that
moment — one moment for all the disks: ``crash`` — over NBD on a unix socket in a
private folder of ``libvirt_socket_dir`` (``mobility/nbdclient.py``). The backup is
*incremental* from the checkpoint of the agent's last acknowledged cycle when libvirt
still has it: the
export's ``qemu:dirty-bitmap:backup-<disk>`` context then names every block written
since. The guest runs on meanwhile (QEMU keeps the old data of what it overwrites in
a scratch image), so the hold lets writes go at once (``Held.released``).

Each disk's tracker (``LibvirtTracker``) answers ``Changed`` with the dirty extents,
or ``Rescan`` when the base cycle has no checkpoint (the first cycle, a checkpoint
deleted behind the agent's back, a domain redefined without its checkpoints) or none
can be made (a protected disk that is not qcow2, raw most often: libvirt keeps dirty
bitmaps in qcow2 images only; the backup is then a full one without a checkpoint, every
cycle, and the reason is the tracker's fallback, in the cycle's report); then
the sender copies (``stage``) exactly the blocks it will read from the export into a
sparse file in the state directory, which it reads as any snapshot. The mapping of
cycles to checkpoints is kept in ``libvirt-checkpoints.json``; checkpoints of other
cycles are deleted at the next hold (their bitmaps merge into their parent, so the
base's still covers every write since it). A backup left running by an agent killed
in a cycle (its socket in ``libvirt_socket_dir``) is ended by the next hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import structlog

from common.fs import atomic_write
from common.subproc import communicate
from mobility.changes import Answer, Changed, Rescan
from mobility.nbdclient import MAX_REQUEST, STATE_DIRTY, NbdClient, NbdError
from mobility.snapshot import Held
from mobility.tracker import load_state

log = structlog.get_logger("mobility.tracker")
PREFIX = "siterecovery-"
MAPPING = "libvirt-checkpoints.json"
STAGE = "libvirt-stage"
READ = 4 << 20
_LABEL = re.compile(r"\+?(\d+):\+?(\d+)")


@dataclass(frozen=True)
class Backup:
    """The pull-mode backup a hold began: where its NBD server listens, the checkpoint
    it created and the one it is incremental from (None: a full backup)."""

    socket: str
    checkpoint: str | None  # None: no checkpoint could be made (``untracked`` says why)
    incremental: str | None
    untracked: str = ""  # why the disks are read whole every cycle ("": tracked)


class LibvirtBackup:
    """The snapshot provider (``hold``) and, through ``tracker``, the change trackers of
    the disks of one libvirt domain (see the module docstring)."""

    def __init__(self, uri: str, domain: str, disks: list[dict[str, str]], state_dir: str,
                 socket_dir: str, timeout: float = 120.0) -> None:
        """``socket_dir``: where each hold makes the private folder of its NBD socket (a
        place QEMU sees too: not a private /tmp)."""
        self.uri, self.domain, self.disks = uri, domain, disks
        self.state_dir, self.socket_dir = Path(state_dir), socket_dir
        self.timeout = timeout
        self.current: Backup | None = None
        self.rescans = 0  # tracker answers that were Rescan with a base to compare with
        self._lock = threading.Lock()  # the mapping file, written from the scan thread

    async def virsh(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "virsh", "-q", "-c", self.uri, *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await communicate(proc, self.timeout)
        except TimeoutError:
            raise RuntimeError(f"virsh {args[0]} did not finish within {self.timeout:g}s"
                               ) from None
        if proc.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args[:2])} failed: "
                               f"{err.decode(errors='replace').strip()} (snapshot = "
                               f"'libvirt' needs the domain {self.domain!r} running at "
                               f"{self.uri} with qcow2 disks)")
        return out.decode(errors="replace")

    async def disk_sizes(self) -> dict[str, int]:
        """Each protected disk's size as the guest sees it (not its image file's)."""
        out: dict[str, int] = {}
        for d in self.disks:
            info = await self.virsh("domblkinfo", self.domain, d["name"])
            m = re.search(r"Capacity:\s+(\d+)", info)
            if m is None:
                raise RuntimeError(f"virsh domblkinfo gave no capacity for {d['name']}")
            out[d["name"]] = int(m.group(1))
        return out

    def tracker(self, disk: str) -> LibvirtTracker:
        return LibvirtTracker(self, disk)

    # -- the mapping of cycles to checkpoints ------------------------------------------

    def mapping(self) -> dict[str, str]:
        try:
            doc = json.loads((self.state_dir / MAPPING).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str)}

    def remember(self, cycle: str, checkpoint: str) -> None:
        with self._lock:
            doc = self.mapping()
            doc[cycle] = checkpoint
            atomic_write(self.state_dir / MAPPING, json.dumps(doc))

    def _forget_except(self, keep: set[str]) -> None:
        with self._lock:
            doc = {k: v for k, v in self.mapping().items() if v in keep}
            atomic_write(self.state_dir / MAPPING, json.dumps(doc))

    # -- the hold -----------------------------------------------------------------------

    async def _qemu_owner(self) -> tuple[int, int] | None:
        """The uid and gid QEMU runs as (its DAC label), or None (as root, unlabelled)."""
        root = ET.fromstring(await self.virsh("dumpxml", self.domain))
        for sec in root.iter("seclabel"):
            label = sec.find("label")
            if sec.get("model") == "dac" and label is not None and label.text:
                m = _LABEL.fullmatch(label.text.strip())
                if m is not None:
                    return int(m.group(1)), int(m.group(2))
        return None

    async def _base_checkpoint(self, existing: set[str]) -> str | None:
        state = await asyncio.to_thread(load_state, self.state_dir)
        if state is None:
            return None
        cp = self.mapping().get(state.last_cycle)
        return cp if cp in existing else None

    async def _untracked(self) -> str:
        """Why libvirt can keep no dirty bitmap for the protected disks ("" when it can):
        checkpoints need every disk in qcow2."""
        root = ET.fromstring(await self.virsh("dumpxml", self.domain))
        formats: dict[str, str] = {}
        for disk in root.iter("disk"):
            target, driver = disk.find("target"), disk.find("driver")
            if target is not None and target.get("dev"):
                formats[str(target.get("dev"))] = (driver.get("type", "raw")
                                                   if driver is not None else "raw")
        other = sorted(f"{d['name']} ({formats.get(d['name'], '?')})" for d in self.disks
                       if formats.get(d["name"]) != "qcow2")
        if not other:
            return ""
        return (f"libvirt keeps dirty bitmaps only in qcow2 images, and {', '.join(other)} "
                "is not: the disks are read whole every cycle (convert the image to qcow2 "
                "to have only the changed blocks read)")

    async def _checkpoints(self) -> set[str]:
        out = await self.virsh("checkpoint-list", self.domain, "--name")
        return {line.strip() for line in out.splitlines() if line.strip()}

    async def _end_stale_backup(self) -> None:
        """End a backup this agent began and never ended (it was killed in a cycle): its
        socket lies in ``socket_dir``. Another's backup is left alone (``backup-begin``
        then fails and says why)."""
        try:
            xml = await self.virsh("backup-dumpxml", self.domain)
        except RuntimeError:
            return  # no backup job
        server = ET.fromstring(xml).find("server")
        sock = server.get("socket", "") if server is not None else ""
        folder = os.path.dirname(sock)
        if os.path.dirname(folder) != os.path.abspath(self.socket_dir):
            return
        log.warning("libvirt_stale_backup_ended", domain=self.domain, socket=sock)
        await self.virsh("domjobabort", self.domain)
        shutil.rmtree(folder, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[Held]:
        await self._end_stale_backup()
        existing = await self._checkpoints()
        base = await self._base_checkpoint(existing)
        for cp in sorted(existing):  # never acknowledged, or superseded by the base
            if cp.startswith(PREFIX) and cp != base:
                await self.virsh("checkpoint-delete", self.domain, cp)
        await asyncio.to_thread(self._forget_except, {base} if base else set())
        untracked = await self._untracked()
        if untracked:
            base = None
        checkpoint = None if untracked else f"{PREFIX}{uuid.uuid4().hex[:16]}"
        os.makedirs(self.socket_dir, mode=0o755, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="nbd-", dir=self.socket_dir)
        stage = self.state_dir / STAGE
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(mode=0o700)
        began = False
        try:
            owner = await self._qemu_owner()
            if owner is not None:  # QEMU creates the socket: only it and root may enter
                os.chown(folder, *owner)
            sock = os.path.join(folder, "nbd.sock")
            disks = "".join(
                f"<disk name={quoteattr(d['name'])} backup='yes' type='file'><scratch "
                f"file={quoteattr(os.path.join(folder, d['name'] + '.scratch'))}/></disk>"
                for d in self.disks)
            backup = ("<domainbackup mode='pull'>"
                      + (f"<incremental>{base}</incremental>" if base else "")
                      + f"<server transport='unix' socket={quoteattr(sock)}/>"
                      f"<disks>{disks}</disks></domainbackup>")
            cpxml = (f"<domaincheckpoint><name>{checkpoint}</name><disks>"
                     + "".join(f"<disk name={quoteattr(d['name'])} checkpoint='bitmap'/>"
                               for d in self.disks) + "</disks></domaincheckpoint>")
            bfile, cfile = os.path.join(folder, "backup.xml"), os.path.join(folder, "cp.xml")
            Path(bfile).write_text(backup)
            Path(cfile).write_text(cpxml)
            await self.virsh("backup-begin", self.domain, "--backupxml", bfile,
                             *(("--checkpointxml", cfile) if checkpoint else ()))
            began = True
            self.current = Backup(sock, checkpoint, base, untracked)
            log.info("libvirt_backup_begun", domain=self.domain, checkpoint=checkpoint,
                     incremental=base, **({"untracked": untracked} if untracked else {}))
            yield Held("crash", {d["path"]: str(stage / d["name"]) for d in self.disks},
                       released=True)
        finally:
            self.current = None
            if began:
                try:
                    await self.virsh("domjobabort", self.domain)
                except RuntimeError as e:
                    log.error("libvirt_backup_not_ended", domain=self.domain, error=str(e),
                              hint=f"end it by hand: virsh domjobabort {self.domain}")
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(stage, ignore_errors=True)


def _block_ranges(extents: list[tuple[int, int]], bs: int, nblocks: int
                  ) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for off, ln in extents:
        lo, hi = off // bs, min(nblocks, -(-(off + ln) // bs))
        if out and out[-1][1] >= lo:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        elif lo < hi:
            out.append((lo, hi))
    return tuple(out)


class LibvirtTracker:
    """One disk's changes from the dirty bitmap of its pull-mode backup; ``stage`` copies
    what the cycle reads from the export."""

    kind = "libvirt"

    def __init__(self, backup: LibvirtBackup, disk: str) -> None:
        self.backup, self.disk = backup, disk

    def changes(self, base: str | None, cycle: str, path: str, size: int,
                block_size: int) -> Answer:
        b = self.backup.current
        if b is None:
            return Rescan("no libvirt backup is running (snapshot is not 'libvirt')")
        if b.checkpoint is None:
            return Rescan(b.untracked)
        self.backup.remember(cycle, b.checkpoint)
        if base is None:
            return Rescan("no acknowledged cycle to compare with")
        if b.incremental is None or self.backup.mapping().get(base) != b.incremental:
            self.backup.rescans += 1
            log.warning("libvirt_checkpoint_lost", disk=self.disk, base=base,
                        hint="the checkpoint of the last acknowledged cycle is gone: "
                             "the disk is read whole")
            return Rescan("libvirt has no checkpoint of the base cycle (deleted, or the "
                          "domain redefined without it)")
        context = f"qemu:dirty-bitmap:backup-{self.disk}"
        try:
            with NbdClient(b.socket, self.disk, (context,)) as c:
                if c.size != size:
                    return Rescan(f"the export is {c.size} bytes, the disk {size}")
                dirty = [(off, ln) for off, ln, fl in c.extents(context) if fl & STATE_DIRTY]
        except (OSError, NbdError) as e:
            return Rescan(f"cannot read the dirty bitmap: {e}")
        return Changed(_block_ranges(dirty, block_size, -(-size // block_size)))

    def stage(self, path: str, size: int, block_size: int,
              ranges: tuple[tuple[int, int], ...] | None) -> None:
        """Copy the blocks ``ranges`` (None: the whole disk) from the export into the
        sparse file ``path`` (the cycle's snapshot path), holes left as holes."""
        b = self.backup.current
        if b is None:
            raise RuntimeError("no libvirt backup is running")
        # A whole disk is read whole: QEMU answers unallocated parts as holes at once.
        want = [(0, size)] if ranges is None else [
            (lo * block_size, min(size, hi * block_size)) for lo, hi in ranges]
        with NbdClient(b.socket, self.disk) as c, open(path, "wb") as f:
            if c.size != size:
                raise RuntimeError(f"the export of {self.disk} is {c.size} bytes, the disk "
                                   f"{size}")
            f.truncate(size)
            fd = f.fileno()
            for lo, hi in want:
                pos = lo
                while pos < hi:
                    n = min(READ, MAX_REQUEST, hi - pos)
                    for at, data in c.read(pos, n):
                        if data is not None:
                            os.pwrite(fd, data, at)
                    pos += n

    def close(self) -> None:
        pass  # the checkpoints stay: the next agent goes on from them
