"""The folder target: a recovered machine as disk images and a VM description in a
directory, for the operator's own tooling (import into a hypervisor, copy elsewhere).

``create`` writes ``<root>/<vm_name>/`` with one image per disk, in the spec's disk order
(``<disk>.img`` raw, ``<disk>.vhd`` fixed VHD or ``<disk>.qcow2``, as the target was built),
then ``vm.json``, written last and atomically: a folder with ``vm.json`` is whole. Raw
images are reflinked where the filesystem can, else copied sparse. The folder is built
under a temporary name and renamed into place, so a crash never leaves half a machine
under the VM's name. ``boot`` cannot boot anything (returns None). ``cleanup`` removes
the folder and any temporary one; a folder already gone is not an error.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from common.fs import atomic_write, fsync_dir
from targets.base import (
    BootProof,
    Recovered,
    RecoveryDisk,
    RecoverySpec,
    Refusal,
    TargetError,
)
from vault.vhd import build_footer, vhd_size

FORMATS = {"raw": "img", "vhd": "vhd", "qcow2": "qcow2"}
DESCRIPTION = "vm.json"
PARTIAL = ".partial"


class FolderTarget:
    """Recovers machines into ``root`` as images of format ``fmt`` (raw | vhd | qcow2)."""

    name = "folder"

    def __init__(self, root: str | os.PathLike[str], fmt: str = "raw") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"folder target format {fmt!r}: allowed: {' | '.join(FORMATS)}")
        self.root, self.fmt = Path(root), fmt

    def folder(self, vm_name: str) -> Path:
        return self.root / vm_name

    async def check(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> list[Refusal]:
        """Refuses a VM name that is not one path component, no disks, and a qcow2 target
        without ``qemu-img``."""
        out = []
        if not spec.vm_name or "/" in spec.vm_name or spec.vm_name in (".", "..") \
                or spec.vm_name.endswith(PARTIAL):
            out.append(Refusal("vm_name", f"{spec.vm_name!r} cannot name a folder; allowed: "
                                          "a name without '/' that is not '.' or '..'"))
        if not disks:
            out.append(Refusal("disks", "no disk to recover; allowed: one disk or more"))
        if self.fmt == "qcow2" and shutil.which("qemu-img") is None:
            out.append(Refusal("format", "qcow2 needs qemu-img, which is not installed; "
                                         "allowed here: raw | vhd"))
        return out

    def planned(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> Recovered:
        """The machine's folder (``cleanup`` removes its ``.partial`` one too)."""
        final = self.folder(spec.vm_name)
        return Recovered(self.name, spec.vm_name, [f"folder:{final}"],
                         {"folder": str(final), "format": self.fmt})

    async def create(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> Recovered:
        """Write the images and ``vm.json``; raises ``TargetError`` (``folder_exists`` if a
        whole machine of that name is already there; ``folder_write_failed``)."""
        final = self.folder(spec.vm_name)
        recovered = self.planned(spec, disks)
        if (final / DESCRIPTION).exists():
            raise TargetError("folder_exists", f"{final} already holds a recovered machine",
                              "clean up the recovery that made it first, or choose another "
                              "VM name")
        work = final.with_name(final.name + PARTIAL)
        try:
            await asyncio.to_thread(self._reset, work, final)
            images = []
            for d in disks:
                image = work / f"{d.name}.{FORMATS[self.fmt]}"
                await self._write(d, image)
                images.append({"name": d.name, "file": image.name, "size": d.size,
                               "format": self.fmt})
            atomic_write(work / DESCRIPTION, json.dumps(describe(spec, images), indent=2)
                         + "\n", 0o644)
            await asyncio.to_thread(self._publish, work, final)
        except (OSError, TargetError) as e:
            if isinstance(e, TargetError):
                e.recovered = recovered
                raise
            raise TargetError("folder_write_failed", f"cannot write {final}: {e}",
                              "check the folder target's root, its free space and "
                              "permissions", recovered) from e
        return recovered

    @staticmethod
    def _reset(work: Path, final: Path) -> None:
        shutil.rmtree(work, ignore_errors=True)  # left by an interrupted create
        shutil.rmtree(final, ignore_errors=True)  # images without vm.json: not whole
        work.mkdir(parents=True, mode=0o700)

    @staticmethod
    def _publish(work: Path, final: Path) -> None:
        fsync_dir(work)
        os.replace(work, final)
        fsync_dir(final.parent)

    async def _write(self, disk: RecoveryDisk, image: Path) -> None:
        if self.fmt == "qcow2":
            await _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk.path),
                       str(image))
            return
        # reflink when the filesystem shares blocks (XFS, btrfs), else a sparse copy
        await _run("cp", "--reflink=auto", "--sparse=always", str(disk.path), str(image))
        if self.fmt == "vhd":
            await asyncio.to_thread(_vhd_footer, image, disk.size)
        else:
            await asyncio.to_thread(_fsync, image)

    async def boot(self, recovered: Recovered, timeout: float) -> BootProof | None:
        return None  # a folder of images runs nothing

    async def cleanup(self, recovered: Recovered) -> None:
        """Remove the folder ``create`` made (and its temporary one); idempotent."""
        final = Path(recovered.details.get("folder") or self.folder(recovered.vm_name))
        if final.parent.resolve() != self.root.resolve():
            raise TargetError("folder_outside_root", f"{final} is not under the folder "
                              f"target's root {self.root}", "remove it by hand if it is yours")
        for p in (final.with_name(final.name + PARTIAL), final):
            await asyncio.to_thread(shutil.rmtree, p, ignore_errors=True)
        if self.root.exists():
            fsync_dir(self.root)

    async def close(self) -> None:
        """Nothing to let go of: the target holds no client or server."""


def describe(spec: RecoverySpec, images: list[dict[str, object]]) -> dict[str, object]:
    """The ``vm.json`` document: the machine, its disks in boot order, its network."""
    return {"name": spec.vm_name, "machine": spec.machine, "cpus": spec.cpus,
            "memory_mib": spec.memory_mib, "firmware": spec.firmware, "disks": images,
            "network": spec.network, "ip": spec.ip, "mac": spec.mac, "drill": spec.drill,
            "boot_marker": spec.boot_marker, "point": spec.point}


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise TargetError("folder_write_failed", f"{argv[0]} failed ({proc.returncode}): "
                          f"{err.decode(errors='replace').strip()}",
                          "check the folder target's root, its free space and permissions")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _vhd_footer(image: Path, size: int) -> None:
    """Turn a raw image into a fixed VHD in place: zero padding to whole MiB (a hole),
    then the footer (vault/vhd.py has the layout)."""
    total = vhd_size(size)
    fd = os.open(image, os.O_RDWR)
    try:
        os.ftruncate(fd, total)
        if os.pwrite(fd, build_footer(total), total) != 512:
            raise OSError(f"short write of the VHD footer to {image}")
        os.fsync(fd)
    finally:
        os.close(fd)
