"""The drill's disk proof, host side: partition table, filesystem kinds, read-only checks.

``verify_image(path)`` reads a raw image's partition table (MBR with its extended chain,
or GPT; a whole-disk filesystem without a table counts as one partition numbered 0),
names each partition's filesystem by its superblock (its magic and sane fields), and
checks ext2/3/4 with ``e2fsck -fn`` and XFS with ``xfs_repair -n`` on a read-only loop
device limited to the partition. Other filesystems are reported ``not_checked``. A dirty
journal or log (a crash-consistent point) is replayed first on a throwaway copy
(``targets.replay``).
Nothing is ever written to the image, and every loop device attached is detached again,
even on cancellation (a process killed mid-check leaves its device to
``targets.loopdev.detach_stale_loops`` at the next start).

A malformed partition table raises ``PartitionTableError`` (a ``TargetError``), naming
what is wrong; a damaged filesystem is not an error but a ``damaged`` entry in the
report, with the checker's last lines, so the caller can fail the drill with them.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from targets.base import TargetError
from targets.loopdev import CheckToolError, LoopDevice
from targets.replay import partition_copy

SECTOR = 512
Status = Literal["clean", "damaged", "not_checked"]
Table = Literal["mbr", "gpt", "none"]
TAIL_LINES = 20
_EXTENDED = {0x05, 0x0F, 0x85}
_GPT_PROTECTIVE = 0xEE


class PartitionTableError(TargetError):
    """The image's partition table cannot be read: the restored disk is not usable."""

    def __init__(self, image: Path, why: str) -> None:
        super().__init__("partition_table", f"{image}: malformed partition table: {why}",
                         "choose another recovery point; this one's first sectors are damaged")


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based as the guest sees it (MBR logical partitions from 5); 0: whole disk
    start: int  # bytes from the start of the image
    size: int  # bytes
    type: str  # MBR type "0x83", GPT type GUID, or "disk" for a whole-disk filesystem


@dataclass(frozen=True)
class PartitionCheck:
    partition: Partition
    fs: str  # ext2 | ext3 | ext4 | xfs | vfat | ntfs | swap | btrfs | lvm2 | unknown
    status: Status
    output_tail: list[str]  # the checker's last lines (empty when not checked)


@dataclass(frozen=True)
class DiskVerification:
    image: Path
    table: Table
    checks: list[PartitionCheck]

    @property
    def damaged(self) -> list[PartitionCheck]:
        return [c for c in self.checks if c.status == "damaged"]

    @property
    def ok(self) -> bool:
        """True when no filesystem was found damaged (``not_checked`` ones do not count)."""
        return not self.damaged


# ---- partition tables -------------------------------------------------------------------

def read_partitions(image: Path) -> tuple[Table, list[Partition]]:
    """The image's partition table and its partitions, in table order.

    Raises ``PartitionTableError`` when the table is malformed (bad GPT checksums, entries
    past the end of the disk or overlapping, a looping extended chain, or neither a table
    nor a filesystem in the first sectors)."""
    size = image.stat().st_size
    with open(image, "rb") as f:
        head = _read(f, 0, 4 * SECTOR)
        if detect_fs(f, 0) != "unknown":
            return "none", [Partition(0, 0, size, "disk")]
        if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
            raise PartitionTableError(image, "no MBR signature (55 AA) and no filesystem "
                                             "at the start of the disk")
        entries = _mbr_entries(image, head[:SECTOR])
        if any(t == _GPT_PROTECTIVE for _, t, _, _ in entries):
            parts = _gpt(image, f, size)
            table: Table = "gpt"
        else:
            parts = _mbr(image, f, entries, size)
            table = "mbr"
    _check_layout(image, parts, size)
    return table, parts


def _read(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def _mbr_entries(image: Path, sector: bytes) -> list[tuple[int, int, int, int]]:
    """(slot 1-4, type, first LBA, sector count) of the primary slots in use. A slot keeps
    its number even when an earlier one is empty, as the guest's kernel numbers them."""
    out = []
    for slot in range(1, 5):
        e = sector[446 + 16 * (slot - 1): 446 + 16 * slot]
        status, ptype = e[0], e[4]
        lba, count = struct.unpack_from("<II", e, 8)
        if ptype == 0:
            continue
        if status not in (0x00, 0x80):
            raise PartitionTableError(image, f"MBR entry {slot} has status byte "
                                             f"0x{status:02x} (only 00 or 80 are valid)")
        out.append((slot, ptype, lba, count))
    return out


def _mbr(image: Path, f: BinaryIO, entries: list[tuple[int, int, int, int]],
         size: int) -> list[Partition]:
    parts: list[Partition] = []
    for slot, ptype, lba, count in entries:
        if ptype in _EXTENDED:
            parts += _logical(image, f, lba, count, size)
        else:
            parts.append(Partition(slot, lba * SECTOR, count * SECTOR, f"0x{ptype:02x}"))
    return parts


def _logical(image: Path, f: BinaryIO, ext_lba: int, ext_count: int,
             size: int) -> list[Partition]:
    """Walk the extended partition's chain of EBRs; logical partitions count from 5."""
    out: list[Partition] = []
    ebr, seen = ext_lba, set[int]()
    while True:
        if ebr in seen or len(seen) > 128:
            raise PartitionTableError(image, f"the extended partition's chain loops at "
                                             f"sector {ebr}")
        seen.add(ebr)
        if (ebr + 1) * SECTOR > size:
            raise PartitionTableError(image, f"an extended boot record at sector {ebr} lies "
                                             "past the end of the disk")
        sector = _read(f, ebr * SECTOR, SECTOR)
        if sector[510:512] != b"\x55\xaa":
            raise PartitionTableError(image, f"the extended boot record at sector {ebr} has "
                                             "no 55 AA signature")
        ptype = sector[446 + 4]
        rel, count = struct.unpack_from("<II", sector, 446 + 8)
        if ptype:
            out.append(Partition(5 + len(out), (ebr + rel) * SECTOR, count * SECTOR,
                                 f"0x{ptype:02x}"))
        nxt_type = sector[462 + 4]
        nxt_rel, _ = struct.unpack_from("<II", sector, 462 + 8)
        if nxt_type not in _EXTENDED or nxt_rel == 0:
            return out
        if nxt_rel >= ext_count:
            raise PartitionTableError(image, f"the extended chain points to sector "
                                             f"{ext_lba + nxt_rel}, outside its partition")
        ebr = ext_lba + nxt_rel


def _gpt(image: Path, f: BinaryIO, size: int) -> list[Partition]:
    """The primary GPT, or the backup at the disk's last sector when the primary is bad."""
    errors = []
    for lba in (1, size // SECTOR - 1):
        try:
            return _gpt_at(image, f, lba, size)
        except PartitionTableError as e:
            errors.append(e.message.split(": ", 2)[-1])
    raise PartitionTableError(image, "GPT: " + "; backup: ".join(errors))


def _gpt_at(image: Path, f: BinaryIO, lba: int, size: int) -> list[Partition]:
    hdr = _read(f, lba * SECTOR, SECTOR)
    if hdr[:8] != b"EFI PART":
        raise PartitionTableError(image, f"no 'EFI PART' header at sector {lba}")
    hsize, hcrc = struct.unpack_from("<II", hdr, 12)
    if not 92 <= hsize <= SECTOR:
        raise PartitionTableError(image, f"header size {hsize} at sector {lba}")
    if zlib.crc32(hdr[:16] + b"\0\0\0\0" + hdr[20:hsize]) != hcrc:
        raise PartitionTableError(image, f"header checksum mismatch at sector {lba}")
    entries_lba, count, esize, ecrc = struct.unpack_from("<QIII", hdr, 72)
    if esize < 128 or count > 4096 or (entries_lba * SECTOR + count * esize) > size:
        raise PartitionTableError(image, f"entry array ({count} x {esize} at sector "
                                         f"{entries_lba}) does not fit the disk")
    raw = _read(f, entries_lba * SECTOR, count * esize)
    if zlib.crc32(raw) != ecrc:
        raise PartitionTableError(image, "partition entry array checksum mismatch")
    parts = []
    for i in range(count):
        e = raw[i * esize:(i + 1) * esize]
        if e[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        if last < first:
            raise PartitionTableError(image, f"GPT entry {i + 1} ends before it starts")
        parts.append(Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR,
                               _guid(e[:16])))
    return parts


def _guid(b: bytes) -> str:
    a, b2, c = struct.unpack_from("<IHH", b)
    return f"{a:08x}-{b2:04x}-{c:04x}-{b[8:10].hex()}-{b[10:16].hex()}".upper()


def _check_layout(image: Path, parts: list[Partition], size: int) -> None:
    spans = sorted(parts, key=lambda p: p.start)
    for p in spans:
        if p.size <= 0 or p.start + p.size > size:
            raise PartitionTableError(image, f"partition {p.number} ({p.start}+{p.size} "
                                             f"bytes) lies past the end of the disk ({size})")
    for a, b in itertools.pairwise(spans):
        if a.start + a.size > b.start:
            raise PartitionTableError(image, f"partitions {a.number} and {b.number} overlap")


# ---- filesystem kinds -------------------------------------------------------------------

def detect_fs(f: BinaryIO, offset: int) -> str:
    """The filesystem whose superblock starts the partition at ``offset`` ("unknown" if
    none is recognised)."""
    head = _read(f, offset, 70 * 1024)
    if head[:4] == b"XFSB":
        return "xfs"
    if _is_ext_superblock(head):
        compat, incompat, ro_compat = struct.unpack_from("<III", head, 1024 + 92)
        # extents, 64bit, flex_bg, or huge_file / metadata_csum: ext4's features
        if incompat & 0x2C0 or ro_compat & 0x408:
            return "ext4"
        return "ext3" if compat & 0x4 else "ext2"
    if head[0x10040:0x10048] == b"_BHRfS_M":
        return "btrfs"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[82:87] == b"FAT32" or head[54:59] in (b"FAT12", b"FAT16"):
        return "vfat"
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    if head[512:520] == b"LABELONE":
        return "lvm2"
    return "unknown"


def _is_ext_superblock(head: bytes) -> bool:
    """An ext2/3/4 superblock at byte 1024: its magic and fields only a real one has.

    Two magic bytes alone are not enough: a boot loader's code in the sectors after an MBR
    (GRUB's core image lives there) holds them at 1080 once in 65,536 disks, and such a
    disk would be taken for a filesystem without a partition table."""
    if len(head) < 1024 + 1024 or head[1024 + 56:1024 + 58] != b"\x53\xef":
        return False
    fields: tuple[int, ...] = struct.unpack_from("<II12xIIIIII", head, 1024)
    inodes, blocks, first_data, log_block, _, per_group, clusters_per_group, per_group_i = (
        fields)
    rev_level: int = struct.unpack_from("<I", head, 1024 + 76)[0]
    # A group's block (or, with bigalloc, cluster) bitmap is one block: 8 bits a byte.
    return (inodes > 0 and blocks > 0 and first_data <= 1 and log_block <= 6
            and per_group > 0 and 0 < clusters_per_group <= 8 << (10 + log_block)
            and per_group_i > 0 and rev_level <= 1)


# ---- read-only checks -------------------------------------------------------------------

async def verify_image(image: Path, tail_lines: int = TAIL_LINES,
                       scratch: Path | None = None) -> DiskVerification:
    """Read ``image``'s table and check every partition's filesystem read-only.

    A dirty ext3/4 journal or XFS log is replayed first on a copy of its partition in
    ``scratch`` (default: the image's folder; see ``targets.replay``)."""
    table, parts = await asyncio.to_thread(read_partitions, image)
    kinds = await asyncio.to_thread(_kinds, image, parts)
    checks = [await _check(image, p, fs, dirty, tail_lines, scratch or image.parent)
              for p, (fs, dirty) in zip(parts, kinds, strict=True)]
    return DiskVerification(image, table, checks)


def _kinds(image: Path, parts: list[Partition]) -> list[tuple[str, bool]]:
    """Each partition's filesystem, and whether its ext journal needs replaying."""
    with open(image, "rb") as f:
        return [(fs, fs in EXT and _ext_needs_recovery(f, p.start))
                for p in parts for fs in [detect_fs(f, p.start)]]


EXT = ("ext2", "ext3", "ext4")
REPLAYED = "(the journal was replayed on a copy of the partition first, as a mount would)"
XFS_DIRTY_LOG = "valuable metadata changes in a log"


def _ext_needs_recovery(f: BinaryIO, offset: int) -> bool:
    (incompat,) = struct.unpack("<I", _read(f, offset + 1024 + 96, 4))
    return bool(incompat & 0x4)  # EXT3_FEATURE_INCOMPAT_RECOVER


async def _check(image: Path, p: Partition, fs: str, dirty: bool, tail_lines: int,
                 scratch: Path) -> PartitionCheck:
    # e2fsck -n: 0 clean; 4 errors left uncorrected; 8 and up: it could not check (a
    # superblock it cannot read is damage too, so all but 0 count as damaged).
    # xfs_repair -n: 0 clean; 1 corruption found; 2 a dirty log it will not replay.
    notes: list[str] = []
    if fs in EXT and dirty:
        async with partition_copy(image, p.start, p.size, scratch) as copy:
            rc, out = await _run("e2fsck", "-E", "journal_only", "-p", str(copy))
            if rc in (0, 1):  # 1: the journal was replayed
                rc, out = await _run("e2fsck", "-f", "-n", str(copy))
                notes = [REPLAYED]
    elif fs in EXT:
        async with LoopDevice(image, p.start, p.size) as dev:
            rc, out = await _run("e2fsck", "-f", "-n", dev)
    elif fs == "xfs":
        async with LoopDevice(image, p.start, p.size) as dev:
            rc, out = await _run("xfs_repair", "-n", dev)
        if rc == 2 or (rc == 1 and XFS_DIRTY_LOG in out):
            rc, out = await _xfs_replayed(image, p, scratch)
            notes = [REPLAYED.replace("journal", "log")]
    else:
        return PartitionCheck(p, fs, "not_checked", [])
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return PartitionCheck(p, fs, "clean" if rc == 0 else "damaged",
                          [*lines[-tail_lines:], *notes, f"(exit status {rc})"])


async def _xfs_replayed(image: Path, p: Partition, scratch: Path) -> tuple[int, str]:
    """xfs_repair -n after the kernel replayed the log (mount, umount) on a copy."""
    async with partition_copy(image, p.start, p.size, scratch) as copy, \
            LoopDevice(copy, 0, p.size, read_only=False) as dev:
        mnt = Path(tempfile.mkdtemp(prefix=".verify-mnt-", dir=scratch))
        try:
            # nouuid: the protected machine's own filesystem may be mounted on this host
            rc, out = await _run("mount", "-t", "xfs", "-o", "nouuid", dev, str(mnt))
            if rc != 0:
                return rc, f"the log could not be replayed: {out}"
            rc, out = await _run("umount", str(mnt))
            if rc != 0:
                raise CheckToolError(f"umount {mnt}", out)
        finally:
            mnt.rmdir()
        return await _run("xfs_repair", "-n", dev)


async def _run(*argv: str) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except FileNotFoundError as e:
        raise CheckToolError(f"{argv[0]} is not installed", str(e)) from e
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")
