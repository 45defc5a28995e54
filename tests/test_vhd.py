"""Restore to a fixed VHD: the footer against the specification, the image against qemu-img."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from common.digest import block_count
from tests.helpers import make_vault, open_vault, run_cli, write_full_point
from vault import names
from vault.vhd import (
    FOOTER_SIZE,
    VHD_EPOCH,
    VhdFooterError,
    build_footer,
    chs_geometry,
    parse_footer,
    vhd_size,
)

BS = 64 * 1024
MIB = 1 << 20
DISK_SIZE = 3 * MIB + 12345  # not a whole number of MiB, nor of blocks


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-img is required in CI (apt-get install qemu-utils)")
        pytest.skip("qemu-img is not installed")
    return path


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# -- footer ------------------------------------------------------------------------------------

def test_footer_checksum_verifies() -> None:
    raw = build_footer(10 * MIB)
    assert len(raw) == FOOTER_SIZE
    stored = struct.unpack(">I", raw[64:68])[0]
    zeroed = raw[:64] + bytes(4) + raw[68:]
    assert stored == ~sum(zeroed) & 0xFFFFFFFF
    f = parse_footer(raw)
    assert f.checksum == stored
    assert raw[:8] == b"conectix"
    assert (f.features, f.version, f.data_offset) == (2, 0x00010000, 0xFFFFFFFFFFFFFFFF)
    assert (f.original_size, f.current_size, f.disk_type) == (10 * MIB, 10 * MIB, 2)
    assert f.creator_os == b"Wi2k" and f.saved_state == 0
    assert raw[85:] == bytes(FOOTER_SIZE - 85)


@pytest.mark.parametrize("offset", [0, 7, 20, 45, 57, 64, 70, 84, 300, 511])
def test_flipped_byte_is_detected(offset: int) -> None:
    raw = bytearray(build_footer(4 * MIB))
    raw[offset] ^= 0x01
    with pytest.raises(VhdFooterError, match="cookie" if offset < 8 else "checksum"):
        parse_footer(bytes(raw))


def test_footer_length_is_checked() -> None:
    with pytest.raises(VhdFooterError, match="512 bytes"):
        parse_footer(build_footer(MIB)[:511])


def test_unique_id_is_random_and_timestamp_is_since_2000() -> None:
    a, b = parse_footer(build_footer(MIB)), parse_footer(build_footer(MIB))
    assert a.unique_id != b.unique_id and len(a.unique_id) == 16
    assert abs(a.timestamp - (int(time.time()) - 946684800)) < 60
    assert VHD_EPOCH == 946684800


# Expected geometries worked by hand from the specification's appendix
# (totalSectors = size / 512; t = cylinders * heads):
@pytest.mark.parametrize(("size", "want"), [
    # 20480 sectors < 65535*16*63: spt 17, t = 20480 // 17 = 1204,
    # heads = (1204 + 1023) // 1024 = 2 -> at least 4; 1204 < 4*1024; cyl = 1204 // 4 = 301
    (10 * MIB, (301, 4, 17)),
    # 409600 sectors: spt 17, t = 24094, heads = 24 > 16 -> spt 31, heads 16,
    # t = 409600 // 31 = 13212 < 16*1024; cyl = 13212 // 16 = 825
    (200 * MIB, (825, 16, 31)),
    # 2097152 sectors: spt 17 gives heads 121 > 16; spt 31 gives t = 67650 >= 16384;
    # spt 63, heads 16, t = 2097152 // 63 = 33288; cyl = 33288 // 16 = 2080
    (1 << 30, (2080, 16, 63)),
    # 83886080 sectors >= 65535*16*63 = 66059280: spt 255, heads 16,
    # t = 83886080 // 255 = 328965; cyl = 328965 // 16 = 20560
    (40 << 30, (20560, 16, 255)),
    # 419430400 sectors > 65535*16*255 = 267382800: capped; spt 255, heads 16,
    # t = 267382800 // 255 = 1048560; cyl = 65535
    (200 << 30, (65535, 16, 255)),
])
def test_chs_matches_the_specification(size: int, want: tuple[int, int, int]) -> None:
    assert chs_geometry(size) == want
    f = parse_footer(build_footer(size))
    assert (f.cylinders, f.heads, f.sectors_per_track) == want


def test_size_is_padded_to_whole_mib() -> None:
    assert vhd_size(MIB) == MIB
    assert vhd_size(MIB + 1) == 2 * MIB
    assert vhd_size(DISK_SIZE) == 4 * MIB
    assert vhd_size(10 * MIB - 512) == 10 * MIB
    with pytest.raises(ValueError, match="whole number of MiB"):
        build_footer(DISK_SIZE)


# -- end to end --------------------------------------------------------------------------------

def _make_disk(path: Path) -> bytes:
    """Random blocks and holes; the short last block holds data right up to the end."""
    rng = random.Random(11)
    data = bytearray(DISK_SIZE)
    for n in range(block_count(DISK_SIZE, BS)):
        if n % 3 == 1 and n != block_count(DISK_SIZE, BS) - 1:
            continue  # a hole
        end = min((n + 1) * BS, DISK_SIZE)
        data[n * BS:end] = rng.randbytes(end - n * BS)
    path.write_bytes(data)
    return bytes(data)


async def _vault_with_point(tmp: Path) -> tuple[Path, Path, Path]:
    """A vault with one point of a disk of DISK_SIZE bytes; returns (vault, key, raw image)."""
    _url, key = await make_vault(tmp)
    disk = tmp / "disk.img"
    data = _make_disk(disk)
    v = await open_vault(tmp / "vault", key)
    await write_full_point(v, data)
    await v.close()
    return tmp / "vault", key, disk


def _restore_vhd(vault: Path, key: Path, out: Path, *extra: str
                 ) -> subprocess.CompletedProcess[str]:
    return run_cli("restore", "--vault", f"file://{vault}", "--key-file", str(key),
                   "--out", str(out), "--format", "vhd", *extra)


async def test_restore_to_vhd_is_what_qemu_img_reads(tmp_path: Path) -> None:
    qemu_img = _qemu_img()
    vault, key, raw = await _vault_with_point(tmp_path)
    out = tmp_path / "out"
    r = _restore_vhd(vault, key, out, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    vhd = out / "sda.vhd"
    assert doc["format"] == "vhd"
    assert doc["disks"][0]["path"] == str(vhd) and doc["disks"][0]["size"] == DISK_SIZE
    assert sorted(p.name for p in out.iterdir()) == ["sda.vhd"]

    padded = 4 * MIB
    assert vhd.stat().st_size == padded + FOOTER_SIZE

    info_run = _run(qemu_img, "info", "--output=json", "-f", "vpc", str(vhd))
    assert info_run.returncode == 0, info_run.stderr
    info = json.loads(info_run.stdout)
    assert info["format"] == "vpc"
    assert info["virtual-size"] == padded

    padded_raw = tmp_path / "padded.img"
    shutil.copy(raw, padded_raw)
    os.truncate(padded_raw, padded)
    cmp = _run(qemu_img, "compare", "-f", "vpc", "-F", "raw", str(vhd), str(padded_raw))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # The comparison is not vacuous: a one-byte difference in the last block is seen.
    with open(padded_raw, "r+b") as f:
        f.seek(DISK_SIZE - 1)
        last = f.read(1)
        f.seek(DISK_SIZE - 1)
        f.write(bytes([last[0] ^ 0xFF]))
    cmp = _run(qemu_img, "compare", "-f", "vpc", "-F", "raw", str(vhd), str(padded_raw))
    assert cmp.returncode == 1, cmp.stdout + cmp.stderr

    with open(vhd, "rb") as f:
        assert f.read(DISK_SIZE) == raw.read_bytes()
        assert f.read(padded - DISK_SIZE) == bytes(padded - DISK_SIZE)
        tail = f.read()
    foot = parse_footer(tail)
    assert tail[:8] == b"conectix"
    assert (foot.features, foot.version, foot.data_offset) == (2, 0x00010000, 2**64 - 1)
    assert foot.original_size == foot.current_size == padded
    assert (foot.cylinders, foot.heads, foot.sectors_per_track) == (120, 4, 17)  # 8192 sectors
    assert foot.disk_type == 2 and foot.saved_state == 0 and foot.creator_os == b"Wi2k"
    assert abs(foot.timestamp - (int(time.time()) - 946684800)) < 600
    assert foot.unique_id != bytes(16)


async def test_tampered_vault_leaves_no_vhd(tmp_path: Path) -> None:
    vault, key, _raw = await _vault_with_point(tmp_path)
    pack = sorted(p for p in (vault / names.PACKS).rglob("*") if p.is_file())[0]
    data = bytearray(pack.read_bytes())
    data[len(data) // 3] ^= 0x40
    pack.write_bytes(bytes(data))
    out = tmp_path / "out"
    r = _restore_vhd(vault, key, out)
    assert r.returncode == 3, r.stderr
    assert "failed verification" in r.stderr
    assert not out.exists() or list(out.iterdir()) == []
