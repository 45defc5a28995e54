"""targets.bootmode on real images (sfdisk, mkfs.vfat, mkfs.ext4, the cached boot disk):
BIOS from boot code in the MBR, UEFI from an EFI system partition holding FAT, both,
neither; a malformed table is an error."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from targets.bootmode import detect_boot
from targets.verify import SECTOR, PartitionTableError, detect_fs, read_partitions
from tests import bootimages as bi
from tests.backends import missing_backend
from tests.bootdisk import bootdisk, missing_tools


@pytest.fixture(autouse=True)
def _tools() -> None:
    bi.need_tools()


def test_the_real_boot_disk_boots_bios_only() -> None:
    if missing_tools():
        missing_backend("the boot disk's tools", f"install {', '.join(missing_tools())}")
    mode = detect_boot(bootdisk())  # SYSLINUX's MBR code, one ext4 partition
    assert (mode.table, mode.firmwares) == ("mbr", ("bios",))
    assert mode.choose("uefi") == "bios" and mode.choose("bios") == "bios"
    assert "boot code in the MBR" in mode.evidence
    assert "no EFI system partition" in mode.evidence


def test_gpt_with_an_efi_system_partition_boots_uefi(tmp_path: Path) -> None:
    mode = detect_boot(bi.gpt(tmp_path / "d.img", bios_boot=False, esp=True))
    assert (mode.table, mode.firmwares) == ("gpt", ("uefi",))
    assert mode.choose("bios") == "uefi"
    assert "EFI system partition 1 (FAT)" in mode.evidence
    assert "no boot code in the protective MBR" in mode.evidence


def test_gpt_with_bios_boot_code_boots_bios(tmp_path: Path) -> None:
    mode = detect_boot(bi.gpt(tmp_path / "d.img", bios_boot=True, esp=False, boot_code=True))
    assert mode.firmwares == ("bios",)
    assert "BIOS boot partition 1" in mode.evidence
    assert "boot code in the protective MBR" in mode.evidence


def test_a_hybrid_disk_boots_both_and_the_setting_chooses(tmp_path: Path) -> None:
    mode = detect_boot(bi.gpt(tmp_path / "d.img", bios_boot=True, esp=True, boot_code=True))
    assert mode.firmwares == ("bios", "uefi")
    assert mode.choose("uefi") == "uefi" and mode.choose("bios") == "bios"


def test_an_mbr_efi_system_partition_boots_uefi(tmp_path: Path) -> None:
    mode = detect_boot(bi.mbr(tmp_path / "d.img", boot_code=False, esp=True))
    assert (mode.table, mode.firmwares) == ("mbr", ("uefi",))


def test_disks_that_boot_neither(tmp_path: Path) -> None:
    # A BIOS boot partition without code in the MBR: nothing for a BIOS to run.
    mode = detect_boot(bi.gpt(tmp_path / "a.img", bios_boot=True, esp=False))
    assert mode.firmwares == () and mode.choose("bios") is None
    # An EFI system partition nobody formatted: nothing for UEFI to read a loader from.
    mode = detect_boot(bi.gpt(tmp_path / "b.img", bios_boot=False, esp=True, esp_fat=False))
    assert mode.firmwares == ()
    assert "EFI system partition 1 holds no FAT filesystem (unknown)" in mode.evidence
    mode = detect_boot(bi.mbr(tmp_path / "c.img", boot_code=False))
    assert mode.firmwares == () and "no boot code in the MBR" in mode.evidence
    mode = detect_boot(bi.whole_disk_ext4(tmp_path / "d.img"))
    assert (mode.table, mode.firmwares) == ("none", ())
    assert "no partition table" in mode.describe()


def test_a_malformed_table_is_an_error(tmp_path: Path) -> None:
    img = bi.blank(tmp_path / "d.img", 4)
    with open(img, "r+b") as f:
        f.write(os.urandom(4096))
    with pytest.raises(PartitionTableError, match="no MBR signature"):
        detect_boot(img)


def test_a_boot_loaders_bytes_holding_the_ext_magic_leave_the_disk_an_mbr_disk(
        tmp_path: Path) -> None:
    # GRUB embeds its core image in the sectors after the MBR; on one disk in 65,536 its
    # bytes at 1080 are ext's magic (53 EF). Seeded random loader bytes around it.
    rnd = random.Random(1080)
    for i in range(8):
        img = bi.mbr(tmp_path / f"d{i}.img", boot_code=True)
        with open(img, "r+b") as f:
            f.seek(SECTOR)
            f.write(rnd.randbytes(1023 * SECTOR))
            f.seek(1024 + 56)
            f.write(b"\x53\xef")
        mode = detect_boot(img)
        assert (mode.table, mode.firmwares) == ("mbr", ("bios",)), mode.evidence


@pytest.mark.parametrize("mkfs", [
    ["mkfs.ext2"], ["mkfs.ext3"], ["mkfs.ext4"], ["mkfs.ext4", "-b", "1024"],
    ["mkfs.ext4", "-b", "65536"], ["mkfs.ext4", "-O", "bigalloc", "-C", "65536"],
    ["mkfs.ext4", "-g", "1024"]], ids=" ".join)
def test_every_ext_layout_mkfs_makes_is_named(tmp_path: Path, mkfs: list[str]) -> None:
    img = bi.blank(tmp_path / "d.img", 64)
    out = subprocess.run([*mkfs, "-q", "-F", str(img)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(img, "rb") as f:
        fs = detect_fs(f, 0)
    assert fs == {"mkfs.ext2": "ext2", "mkfs.ext3": "ext3"}.get(mkfs[0], "ext4")
    assert read_partitions(img)[0] == "none"
