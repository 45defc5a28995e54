"""targets.verify on real images: tables written by sfdisk, filesystems by mkfs, checks by
e2fsck and xfs_repair on real read-only loop devices."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from targets.loopdev import detach_stale_loops
from targets.verify import PartitionTableError, read_partitions, verify_image
from tests.backends import missing_backend
from tests.helpers import sha256

MIB = 1 << 20
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("sfdisk", "mkfs.ext4", "mkfs.xfs", "e2fsck", "xfs_repair", "losetup",
                 "dumpe2fs", "xfs_io", "mount"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs fdisk, e2fsprogs, xfsprogs")


def _needs_root() -> None:
    if os.geteuid() != 0:
        missing_backend("root (read-only loop devices)", "run the suite as root")


def _fs(tmp: Path, kind: str, size_mib: int, name: str) -> Path:
    """A filesystem image with a few files in it (ext4 via mkfs -d, XFS empty)."""
    img = tmp / f"{name}.fs"
    with open(img, "wb") as f:
        f.truncate(size_mib * MIB)
    if kind == "ext4":
        content = tmp / f"{name}.content"
        (content / "etc").mkdir(parents=True)
        for i in range(40):
            (content / "etc" / f"file{i}").write_text(f"line {i}\n" * 50)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(img)],
                       check=True)
    else:
        subprocess.run(["mkfs.xfs", "-q", "-f", str(img)], check=True)
    return img


def _disk(tmp: Path, script: str, size_mib: int, fill: dict[int, Path]) -> Path:
    """A disk image partitioned by sfdisk with ``script``; ``fill`` maps a partition
    number to a filesystem image written at its start."""
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size_mib * MIB)
    subprocess.run(["sfdisk", "-q", str(disk)], input=script, text=True, check=True,
                   stdout=subprocess.DEVNULL)
    _, parts = read_partitions(disk)
    starts = {p.number: p.start for p in parts}
    with open(disk, "r+b") as f:
        for number, fs in fill.items():
            f.seek(starts[number])
            f.write(fs.read_bytes())
    return disk


def _attached(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True,
                          check=True).stdout


async def test_mbr_disk_with_ext4_xfs_and_a_logical_partition(tmp_path: Path) -> None:
    _needs_root()
    ext4, xfs = _fs(tmp_path, "ext4", 24, "a"), _fs(tmp_path, "xfs", 320, "b")
    disk = _disk(tmp_path, "label: dos\n"
                           "start=2048, size=24MiB, type=83, bootable\n"
                           "size=320MiB, type=83\n"
                           "type=5\n"
                           "size=8MiB, type=da\n", 360, {1: ext4, 2: xfs})
    report = await verify_image(disk)
    assert report.table == "mbr"
    got = [(c.partition.number, c.partition.type, c.fs, c.status) for c in report.checks]
    assert got == [(1, "0x83", "ext4", "clean"), (2, "0x83", "xfs", "clean"),
                   (5, "0xda", "unknown", "not_checked")]
    assert report.checks[0].partition.start == 2048 * 512
    assert report.checks[0].partition.size == 24 * MIB
    assert report.ok and report.checks[2].output_tail == []
    assert "(exit status 0)" in report.checks[0].output_tail
    assert _attached(disk) == ""


async def test_gpt_disk_with_ext4_and_xfs(tmp_path: Path) -> None:
    _needs_root()
    ext4, xfs = _fs(tmp_path, "ext4", 24, "a"), _fs(tmp_path, "xfs", 320, "b")
    disk = _disk(tmp_path, "label: gpt\n"
                           f"size=24MiB, type={LINUX_FS_GUID}\n"
                           f"size=320MiB, type={LINUX_FS_GUID}\n", 360, {1: ext4, 2: xfs})
    report = await verify_image(disk)
    assert report.table == "gpt"
    assert [(c.partition.number, c.partition.type, c.fs, c.status)
            for c in report.checks] == [(1, LINUX_FS_GUID, "ext4", "clean"),
                                        (2, LINUX_FS_GUID, "xfs", "clean")]
    assert _attached(disk) == ""


async def test_whole_disk_filesystem_counts_as_one_partition(tmp_path: Path) -> None:
    _needs_root()
    img = _fs(tmp_path, "ext4", 24, "whole")
    report = await verify_image(img)
    assert report.table == "none"
    assert [(c.partition.number, c.partition.type, c.fs, c.status)
            for c in report.checks] == [(0, "disk", "ext4", "clean")]


def _inode_table_block(fs: Path) -> int:
    dump = subprocess.run(["dumpe2fs", str(fs)], capture_output=True, text=True,
                          check=True).stdout
    m = re.search(r"Inode table at (\d+)-", dump)
    assert m is not None
    return int(m.group(1))


async def test_damaged_ext4_is_reported_with_e2fsck_findings(tmp_path: Path) -> None:
    _needs_root()
    ext4 = _fs(tmp_path, "ext4", 24, "a")
    with open(ext4, "r+b") as f:  # the first 16 blocks of group 0's inode table (root: #2)
        f.seek(_inode_table_block(ext4) * 4096)
        f.write(b"\xa5" * 16 * 4096)
    disk = _disk(tmp_path, "label: dos\nstart=2048, size=24MiB, type=83\n", 32, {1: ext4})
    report = await verify_image(disk)
    [check] = report.checks
    assert (check.fs, check.status) == ("ext4", "damaged")
    assert not report.ok and report.damaged == [check]
    text = "\n".join(check.output_tail)
    # 4: errors left uncorrected; 8/12: e2fsck could not get past them (here the journal
    # inode lies in the overwritten blocks). Either way e2fsck names what it found.
    assert re.search(r"\(exit status (4|8|12)\)", text), text
    assert re.search(r"[Ii]node", text) and "errors" in text, text
    assert _attached(disk) == ""


def _mbr_entry(disk: Path, slot: int, status: int, ptype: int, lba: int, count: int) -> None:
    with open(disk, "r+b") as f:
        f.seek(446 + 16 * (slot - 1))
        f.write(bytes([status, 0, 0, 0, ptype, 0, 0, 0]) + lba.to_bytes(4, "little")
                + count.to_bytes(4, "little"))


def _blank(tmp: Path, size_mib: int = 8) -> Path:
    disk = tmp / "blank.img"
    with open(disk, "wb") as f:
        f.truncate(size_mib * MIB)
    return disk


def test_malformed_tables_are_clear_errors(tmp_path: Path) -> None:
    disk = _blank(tmp_path)
    with pytest.raises(PartitionTableError, match="no MBR signature"):
        read_partitions(disk)
    with open(disk, "r+b") as f:
        f.seek(510)
        f.write(b"\x55\xaa")
    _mbr_entry(disk, 1, 0x12, 0x83, 2048, 2048)
    with pytest.raises(PartitionTableError, match="status byte 0x12"):
        read_partitions(disk)
    _mbr_entry(disk, 1, 0x80, 0x83, 2048, 64 * 2048)
    with pytest.raises(PartitionTableError, match="past the end of the disk") as e:
        read_partitions(disk)
    assert e.value.code == "partition_table" and e.value.hint
    _mbr_entry(disk, 1, 0x80, 0x83, 2048, 4096)
    _mbr_entry(disk, 2, 0x00, 0x83, 4096, 2048)
    with pytest.raises(PartitionTableError, match="partitions 1 and 2 overlap"):
        read_partitions(disk)
    _mbr_entry(disk, 2, 0x00, 0x05, 8192, 4096)  # an extended partition whose EBR is blank
    with pytest.raises(PartitionTableError, match="extended boot record at sector 8192"):
        read_partitions(disk)


def test_gpt_falls_back_to_its_backup_then_refuses(tmp_path: Path) -> None:
    disk = _blank(tmp_path)
    subprocess.run(["sfdisk", "-q", str(disk)], input=f"label: gpt\nsize=2MiB, "
                   f"type={LINUX_FS_GUID}\n", text=True, check=True, stdout=subprocess.DEVNULL)
    good = read_partitions(disk)
    with open(disk, "r+b") as f:  # flip a byte of the primary header: its CRC no longer fits
        f.seek(512 + 40)
        f.write(b"\xff")
    assert read_partitions(disk) == good
    with open(disk, "r+b") as f:  # and the backup header at the last sector
        f.seek(8 * MIB - 512 + 40)
        f.write(b"\xff")
    with pytest.raises(PartitionTableError, match=r"header checksum mismatch at sector 1;"
                                                  r".*checksum mismatch at sector 16383"):
        read_partitions(disk)


def _crashed_fs(tmp: Path, kind: str, size_mib: int) -> Path:
    """A filesystem copied as a power cut leaves it: mounted, written, then shut down
    with its journal/log flushed but not checkpointed (``xfs_io shutdown -f``)."""
    live, mnt = tmp / f"{kind}-live.fs", tmp / f"{kind}-mnt"
    with open(live, "wb") as f:
        f.truncate(size_mib * MIB)
    subprocess.run([f"mkfs.{kind}", "-q", *(["-F"] if kind == "ext4" else ["-f"]), str(live)],
                   check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(live), str(mnt)], check=True)
    try:
        for i in range(300):
            (mnt / f"d{i}").mkdir()
            (mnt / f"d{i}" / "f").write_text(f"{i}\n")
        subprocess.run(["xfs_io", "-x", "-c", "shutdown -f", str(mnt)], check=True)
        crashed = tmp / f"{kind}-crashed.fs"
        shutil.copyfile(live, crashed)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return crashed


def _plain_xfs_repair(fs: Path) -> str:
    dev = subprocess.run(["losetup", "--read-only", "--find", "--show", str(fs)],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        return subprocess.run(["xfs_repair", "-n", dev], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True).stdout
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


async def test_a_dirty_xfs_log_is_replayed_on_a_copy_not_the_image(tmp_path: Path) -> None:
    _needs_root()
    xfs = _crashed_fs(tmp_path, "xfs", 320)
    # as it is, xfs_repair -n would call this crash-consistent filesystem damaged
    assert "valuable metadata changes in a log" in _plain_xfs_repair(xfs)
    disk = _disk(tmp_path, f"label: gpt\nsize=320MiB, type={LINUX_FS_GUID}\n", 330, {1: xfs})
    before = sha256(disk)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    report = await verify_image(disk, scratch=scratch)
    [check] = report.checks
    assert (check.fs, check.status) == ("xfs", "clean"), check.output_tail
    assert any("log was replayed on a copy" in ln for ln in check.output_tail)
    assert sha256(disk) == before  # the image itself is never written
    assert list(scratch.iterdir()) == [] and _attached(disk) == ""


def _features(fs: Path) -> str:
    return subprocess.run(["dumpe2fs", "-h", str(fs)], capture_output=True, text=True,
                          check=True).stdout


async def test_an_ext4_needing_recovery_is_checked_after_its_journal(tmp_path: Path) -> None:
    _needs_root()
    ext4 = _crashed_fs(tmp_path, "ext4", 32)
    assert "needs_recovery" in _features(ext4)
    disk = _disk(tmp_path, "label: dos\nstart=2048, size=32MiB, type=83\n", 40, {1: ext4})
    before = sha256(disk)
    report = await verify_image(disk)  # scratch: the image's own folder
    [check] = report.checks
    assert (check.fs, check.status) == ("ext4", "clean"), check.output_tail
    assert any("journal was replayed on a copy" in ln for ln in check.output_tail)
    assert sha256(disk) == before
    assert sorted(p.name for p in tmp_path.glob(".verify-*")) == []


def test_stale_loop_devices_under_a_work_root_are_detached(tmp_path: Path) -> None:
    _needs_root()
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    kept, gone, foreign = work / "kept.img", work / "gone.img", other / "x.img"
    for img in (kept, gone, foreign):
        with open(img, "wb") as f:
            f.truncate(MIB)
    devs = [subprocess.run(["losetup", "--read-only", "--find", "--show", str(img)],
                           capture_output=True, text=True, check=True).stdout.strip()
            for img in (kept, gone, foreign)]
    try:
        gone.unlink()  # as when a killed check's work folder was removed afterwards
        assert sorted(detach_stale_loops(work)) == sorted(devs[:2])
        assert _attached(kept) == "" and _attached(foreign) != ""
        assert detach_stale_loops(work) == []
    finally:
        for dev in devs:
            subprocess.run(["losetup", "--detach", dev], capture_output=True)
