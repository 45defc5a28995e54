"""Restore a recovery point's disk to a fixed VHD (the format Azure uploads take).

A fixed VHD is the raw disk, zero-padded to a whole number of MiB (Azure requires
the virtual size to be a multiple of 1 MiB), followed by one 512-byte footer. All
integers are big-endian (Microsoft, "Virtual Hard Disk Image Format Specification"):

    Offset | Size | Field
    -------+------+-------------------------------------------------------------
         0 |    8 | cookie "conectix"
         8 |    4 | features: 0x00000002 (the reserved bit, always set)
        12 |    4 | file format version: 0x00010000
        16 |    8 | data offset: 0xFFFFFFFFFFFFFFFF (fixed disks have no header)
        24 |    4 | timestamp: seconds since 2000-01-01 00:00:00 UTC
        28 |    4 | creator application (see CREATOR_APP)
        32 |    4 | creator version
        36 |    4 | creator host OS: "Wi2k" (0x5769326B)
        40 |    8 | original size: the virtual size in bytes
        48 |    8 | current size: the virtual size in bytes
        56 |    4 | disk geometry: cylinders (2), heads (1), sectors per track (1)
        60 |    4 | disk type: 2 = fixed
        64 |    4 | checksum: ones' complement of the byte sum, this field zeroed
        68 |   16 | unique id (random)
        84 |    1 | saved state: 0
        85 |  427 | reserved, zero

``materialize_vhd`` keeps materialize's guarantee: the disk is written and verified
under a temporary name, padded (sparse) and given its footer, synced, and only then
renamed; on any failure nothing is left under the requested name.
"""

from __future__ import annotations

import os
import stat
import struct
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from vault.errors import FormatError
from vault.index import BlockIndex
from vault.mapranges import RANGE_BLOCKS
from vault.materialize import Progress, materialize
from vault.point import Point
from vault.repo import Vault

FOOTER_SIZE = 512
MIB = 1 << 20
COOKIE = b"conectix"
FEATURES = 0x00000002
FILE_FORMAT_VERSION = 0x00010000
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
DISK_TYPE_FIXED = 2
# Readers (qemu's vpc driver among them) take the virtual size from the CHS geometry,
# which is usually smaller than the current size, unless the creator is one known to
# mean the current size; "win " (Hyper-V, what Azure itself produces) is the one they
# all know. With it the disk is read at exactly its current size, never truncated.
CREATOR_APP = b"win "
CREATOR_VERSION = 0x00000001
CREATOR_HOST_OS = b"Wi2k"
VHD_EPOCH = 946684800  # 2000-01-01 00:00:00 UTC as a Unix time

# ">" big-endian, no padding: 85 bytes of fields, the reserved rest is zero.
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_CHECKSUM_AT = 64


class VhdFooterError(FormatError):
    """A VHD footer is not one (bad cookie, bad checksum, wrong length)."""


@dataclass(frozen=True)
class Footer:
    cookie: bytes
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int


def vhd_size(raw_size: int) -> int:
    """The virtual size of a VHD holding ``raw_size`` bytes: rounded up to whole MiB."""
    if raw_size < 0:
        raise ValueError(f"negative disk size {raw_size}")
    return -(-raw_size // MIB) * MIB


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) per the VHD specification's appendix."""
    total = min(size // 512, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def checksum(footer: bytes | bytearray) -> int:
    """Ones' complement of the sum of the footer's bytes, checksum field taken as zero."""
    total = sum(footer) - sum(footer[_CHECKSUM_AT:_CHECKSUM_AT + 4])
    return ~total & 0xFFFFFFFF


def build_footer(size: int, *, timestamp: int | None = None,
                 unique_id: bytes | None = None) -> bytes:
    """The footer of a fixed VHD of virtual size ``size`` (a whole number of MiB)."""
    if size <= 0 or size % MIB:
        raise ValueError(f"a fixed VHD's size must be a positive whole number of MiB, "
                         f"not {size}")
    uid = os.urandom(16) if unique_id is None else unique_id
    if len(uid) != 16:
        raise ValueError("the unique id is 16 bytes")
    ts = int(time.time()) - VHD_EPOCH if timestamp is None else timestamp
    cyl, heads, spt = chs_geometry(size)
    buf = bytearray(FOOTER_SIZE)
    _FOOTER.pack_into(buf, 0, COOKIE, FEATURES, FILE_FORMAT_VERSION, FIXED_DATA_OFFSET,
                      ts & 0xFFFFFFFF, CREATOR_APP, CREATOR_VERSION, CREATOR_HOST_OS,
                      size, size, cyl, heads, spt, DISK_TYPE_FIXED, 0, uid, 0)
    struct.pack_into(">I", buf, _CHECKSUM_AT, checksum(buf))
    return bytes(buf)


def parse_footer(data: bytes) -> Footer:
    """Decode and check a footer; raise ``VhdFooterError`` if it is not a valid one."""
    if len(data) != FOOTER_SIZE:
        raise VhdFooterError(f"a VHD footer is {FOOTER_SIZE} bytes, not {len(data)}")
    f = Footer(*_FOOTER.unpack_from(data))
    if data[:8] != COOKIE:
        raise VhdFooterError(f"bad VHD footer cookie {data[:8]!r} (expected {COOKIE!r}): "
                             "not a VHD file")
    want = checksum(data)
    if f.checksum != want:
        raise VhdFooterError(f"VHD footer checksum is {f.checksum:#010x}, the footer sums to "
                             f"{want:#010x}: the footer is damaged")
    return f


async def materialize_vhd(
    vault: Vault,
    point: Point,
    disk: str,
    out: str,
    *,
    index: BlockIndex,
    executor: Executor | None = None,
    progress: Progress | None = None,
    range_blocks: int = RANGE_BLOCKS,
) -> str:
    """Write ``disk`` of ``point`` to ``out`` as a fixed VHD; return the verified digest
    (the disk restored range by range as ``materialize`` does)."""
    if os.path.exists(out) and stat.S_ISBLK(os.stat(out).st_mode):
        raise ValueError(f"{out} is a block device: write a raw image to it, not a VHD")
    size = vhd_size(point.disk(disk).size)
    tmp = out + ".partial"
    # materialize verifies into tmp + ".partial" and renames it to tmp only when whole.
    digest = await materialize(vault, point, disk, tmp, index=index, executor=executor,
                               progress=progress, range_blocks=range_blocks)
    try:
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.ftruncate(fd, size)  # zero padding as a hole
            footer = build_footer(size)
            if os.pwrite(fd, footer, size) != FOOTER_SIZE:
                raise OSError(f"short write of the VHD footer to {tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return digest
