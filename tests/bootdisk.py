"""A small bootable Linux disk for drills, built from Debian packages and cached.

``bootdisk()`` returns the path of a raw 64 MiB MBR disk: SYSLINUX's MBR boot code, one
bootable ext4 partition holding EXTLINUX, Debian's kernel and an initramfs of
busybox-static plus the modules that reach a virtio disk (virtio_pci, virtio_blk, ext4 and
their dependencies, read from each module's ``depends=``) and those that let a guest hear
the ACPI power button (evdev, button: an init of a test's own can answer ``virsh
shutdown`` with busybox's ``acpid``; this one does not need them). The initramfs's init mounts
``/dev/vda1`` read-only and prints on the serial console (``console=ttyS0``) one line::

    siterecovery-boot-ok hostname=<the root's /etc/hostname> drill=<its /etc/siterecovery-drill>

then powers the machine off. The cached image is shared: copy it before changing it.

Built once per ``VERSION`` under ``.cache/bootdisk/<VERSION>/`` (change ``VERSION`` to
rebuild); needs root (a loop mount for EXTLINUX's install), ``apt-get download``,
``dpkg-deb``, ``sfdisk`` (fdisk), ``mkfs.ext4`` (e2fsprogs), ``losetup``/``mount``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import REPO

VERSION = "2"
CACHE = REPO / ".cache" / "bootdisk"
MARKER = "siterecovery-boot-ok"
HOSTNAME = "drill-source"
DRILL_TEXT = "bootdisk-v1"  # /etc/siterecovery-drill (tests compare it: not the VERSION)
DISK_MIB = 64
PART_START = 2048  # sectors: the partition starts at 1 MiB
WANTED_MODULES = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "evdev", "button"]
TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "sfdisk", "mkfs.ext4", "losetup", "mount")

# an initramfs init's first lines: busybox's applets, /proc, /sys, /dev, the modules
INIT_HEAD = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.load); do insmod "/modules/$m.ko"; done
"""

INIT = INIT_HEAD + """root=/dev/vda1
for arg in $(cat /proc/cmdline); do
  case "$arg" in root=*) root="${arg#root=}";; esac
done
echo "siterecovery-init: waiting for $root"
i=0
while [ ! -b "$root" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if mount -t ext4 -o ro "$root" /root; then
  h=$(cat /root/etc/hostname 2>/dev/null)
  d=$(head -n 1 /root/etc/siterecovery-drill 2>/dev/null)
  echo "siterecovery-boot-ok hostname=$h drill=$d"
  umount /root
else
  echo "siterecovery-boot-failed: cannot mount $root"
fi
sync
poweroff -f
"""

EXTLINUX_CONF = """SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /boot/vmlinuz
  INITRD /boot/initrd.gz
  APPEND root=/dev/vda1 console=ttyS0 panic=-1 loglevel=4
"""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def bootdisk() -> Path:
    """The cached boot disk's path, building it first if this ``VERSION`` has none."""
    done = CACHE / VERSION / "disk.img"
    if done.exists():
        return done
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=f".build-{VERSION}-") as tmp:
        image = _build(Path(tmp))
        final = CACHE / VERSION
        final.mkdir(exist_ok=True)
        # rename is atomic: a concurrent builder's image is as good as ours
        os.replace(image, done)
    return done


def _run(*argv: str | Path, cwd: Path | None = None) -> str:
    res = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {res.returncode}\n"
                           f"{res.stdout}{res.stderr}")
    return res.stdout


def kernel_package() -> str:
    out = _run("apt-cache", "depends", "linux-image-amd64")
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends: ")
        if name.startswith("linux-image-") and name != "linux-image-amd64":
            return name
    raise RuntimeError(f"no kernel package behind linux-image-amd64:\n{out}")


def _build(work: Path) -> Path:
    debs, tree = work / "debs", work / "tree"
    debs.mkdir()
    try:
        _run("apt-get", "download", "-q", kernel_package(), "busybox-static", "extlinux",
             "syslinux-common", cwd=debs)
    except RuntimeError:  # package lists missing or stale (a new machine): refresh, once
        _run("apt-get", "update", "-qq")
        _run("apt-get", "download", "-q", kernel_package(), "busybox-static", "extlinux",
             "syslinux-common", cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run("dpkg-deb", "-x", deb, tree)
    [vmlinuz] = sorted(tree.glob("boot/vmlinuz-*"))
    [moddir] = sorted(tree.glob("lib/modules/*"))

    root = work / "root"
    (root / "boot" / "extlinux").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(vmlinuz, root / "boot" / "vmlinuz")
    (root / "boot" / "initrd.gz").write_bytes(_initramfs(tree / "bin" / "busybox", moddir))
    (root / "boot" / "extlinux" / "extlinux.conf").write_text(EXTLINUX_CONF)
    (root / "etc" / "hostname").write_text(HOSTNAME + "\n")
    (root / "etc" / "siterecovery-drill").write_text(DRILL_TEXT + "\n")

    part = work / "part.img"
    with open(part, "wb") as f:
        f.truncate((DISK_MIB - 1) << 20)
    # EXTLINUX 6.04 fails to load extent-mapped files ("I/O error") and 64bit tables:
    # the boot partition is ext4 with block maps (flex_bg, huge_file, dir_index stay).
    _run("mkfs.ext4", "-q", "-F", "-O", "^64bit,^metadata_csum,^extent", "-L", "root",
         "-d", root, part)
    mnt = work / "mnt"
    mnt.mkdir()
    _run("mount", "-o", "loop", part, mnt)
    try:
        _run(tree / "usr" / "bin" / "extlinux", "--install", mnt / "boot" / "extlinux")
    finally:
        _run("umount", mnt)

    disk = work / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB << 20)
    _run_input(f"label: dos\nstart={PART_START}, type=83, bootable\n", "sfdisk", "-q", disk)
    mbr = (tree / "usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    with open(disk, "r+b") as f:
        f.write(mbr[:440])  # boot code only: the table sfdisk wrote stays
        f.seek(PART_START * 512)
        with open(part, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
    return disk


def _run_input(text: str, *argv: str | Path) -> None:
    res = subprocess.run([str(a) for a in argv], input=text, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{argv}: {res.stdout}{res.stderr}")


def _module_paths(moddir: Path) -> dict[str, Path]:
    return {p.name.removesuffix(".ko").replace("-", "_"): p
            for p in moddir.rglob("*.ko")}


def _depends(ko: Path) -> list[str]:
    """The module's ``depends=`` from its .modinfo strings."""
    for field in ko.read_bytes().split(b"\0"):
        if field.startswith(b"depends="):
            return [d.replace("-", "_") for d in field[8:].decode().split(",") if d]
    return []


def load_order(moddir: Path, wanted: list[str]) -> list[tuple[str, Path]]:
    """``wanted`` and everything they depend on, dependencies first."""
    paths, order, seen = _module_paths(moddir), [], set[str]()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in _depends(paths[name]):
            visit(dep)
        order.append((name, paths[name]))

    for w in wanted:
        visit(w)
    return order


def _initramfs(busybox: Path, moddir: Path) -> bytes:
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "root", "modules"):
        cpio.add(d, 0o040755)
    cpio.add("dev/console", 0o020600, rdev=(5, 1))
    cpio.add("bin/busybox", 0o100755, busybox.read_bytes())
    cpio.add("init", 0o100755, INIT.encode())
    order = load_order(moddir, WANTED_MODULES)
    for name, ko in order:
        cpio.add(f"modules/{name}.ko", 0o100644, ko.read_bytes())
    cpio.add("modules.load", 0o100644, "".join(f"{n}\n" for n, _ in order).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


class Cpio:
    """The kernel's initramfs format: a ``newc`` cpio archive (no root needed for nodes)."""

    def __init__(self) -> None:
        self.out, self.ino = bytearray(), 1

    def add(self, name: str, mode: int, data: bytes = b"",
            rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.out += b"070701" + "".join(f"{v:08x}" for v in fields).encode()
        self.out += name.encode() + b"\0"
        self._pad()
        self.out += data
        self._pad()

    def _pad(self) -> None:
        self.out += bytes(-len(self.out) % 4)

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self.out)
