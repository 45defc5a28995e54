"""Raw disk images that boot with BIOS, UEFI, both or neither, built with the real tools.

Partition tables come from ``sfdisk`` (fdisk), EFI system partitions get a FAT
filesystem from ``mkfs.vfat`` (dosfstools), root partitions ext4 from ``mkfs.ext4``.
BIOS boot code is the first 440 bytes of the cached boot disk's MBR (SYSLINUX's) when
the caller gives it, else stand-in bytes: what decides how a disk boots is whether the
code is there, not which loader it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.backends import missing_backend

MIB = 1 << 20
SECTOR = 512
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
TOOLS = {"sfdisk": "fdisk", "mkfs.vfat": "dosfstools", "mkfs.ext4": "e2fsprogs"}
# sectors: BIOS boot 1-2 MiB, ESP 2-10 MiB, root from 10 MiB
_BIOS_AT, _ESP_AT, _ESP_SECTORS, _ROOT_AT = 2048, 4096, 16384, 20480


def need_tools() -> None:
    """Skip locally, fail in CI, when a tool that builds the images is missing."""
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            missing_backend(tool, f"apt-get install {package} (tests/run.sh installs it)")


def _run(*argv: str, stdin: str | None = None) -> None:
    out = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {out.stdout}{out.stderr}")


def blank(path: Path, mib: int = 40) -> Path:
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
    return path


def write_boot_code(path: Path, code: bytes | None = None) -> None:
    """Boot code in front of the (protective) MBR's table, as a boot loader installs it."""
    code = code if code is not None else b"\xfa\x31\xc0" + os.urandom(437)
    assert len(code) == 440
    with open(path, "r+b") as f:
        f.write(code)


def _fat(path: Path, start: int, sectors: int) -> None:
    _run("mkfs.vfat", f"--offset={start}", "-n", "ESP", str(path), str(sectors // 2))


def _ext4(path: Path, start: int) -> None:
    size = path.stat().st_size - start * SECTOR
    _run("mkfs.ext4", "-q", "-F", "-E", f"offset={start * SECTOR}", str(path),
         f"{size // 1024}k")


def gpt(path: Path, *, bios_boot: bool, esp: bool, esp_fat: bool = True,
        code: bytes | None = None, boot_code: bool = False) -> Path:
    """A GPT disk: an optional BIOS boot partition, an optional EFI system partition
    (FAT unless ``esp_fat`` is False), an ext4 root; boot code in the protective MBR
    when ``boot_code``."""
    blank(path)
    lines = ["label: gpt"]
    if bios_boot:
        lines.append(f"start={_BIOS_AT}, size=2048, type={BIOS_BOOT}")
    if esp:
        lines.append(f"start={_ESP_AT}, size={_ESP_SECTORS}, type={ESP}")
    lines.append(f"start={_ROOT_AT}, type={LINUX}")
    _run("sfdisk", "-q", str(path), stdin="\n".join(lines) + "\n")
    if esp and esp_fat:
        _fat(path, _ESP_AT, _ESP_SECTORS)
    _ext4(path, _ROOT_AT)
    if boot_code:
        write_boot_code(path, code)
    return path


def mbr(path: Path, *, boot_code: bool, esp: bool = False, code: bytes | None = None
        ) -> Path:
    """An MBR disk: an optional EFI system partition (type 0xef, FAT), an ext4 root
    marked bootable; boot code in front of the table when ``boot_code``."""
    blank(path)
    lines = ["label: dos"]
    if esp:
        lines.append(f"start={_ESP_AT}, size={_ESP_SECTORS}, type=ef")
    lines.append(f"start={_ROOT_AT}, type=83, bootable")
    _run("sfdisk", "-q", str(path), stdin="\n".join(lines) + "\n")
    if esp:
        _fat(path, _ESP_AT, _ESP_SECTORS)
    _ext4(path, _ROOT_AT)
    if boot_code:
        write_boot_code(path, code)
    return path


def whole_disk_ext4(path: Path) -> Path:
    """A filesystem on the whole disk, no partition table (a data disk's layout)."""
    blank(path)
    _run("mkfs.ext4", "-q", "-F", str(path))
    return path
