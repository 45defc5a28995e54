"""A point's fingerprint map read back from the vault (what a resync compares against)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.digest import fingerprint
from tests.helpers import BLOCK, make_disk, make_vault, open_vault, write_full_point
from vault.errors import IntegrityError
from vault.fpmap import point_fingerprints


async def test_fingerprints_match_the_disk_block_by_block(tmp_path: Path) -> None:
    _url, key = await make_vault(tmp_path)
    disk = tmp_path / "disk.img"
    make_disk(disk, 3 * (1 << 20) + 12345, seed=9)  # zeros, data and a short last block
    data = disk.read_bytes()
    vault = await open_vault(tmp_path / "vault", key)
    try:
        point = await write_full_point(vault, data)
        fps = await point_fingerprints(vault, point, "sda", index=await vault.load_index())
        want = b"".join(fingerprint(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK))
        assert fps == want
    finally:
        await vault.close()


async def test_a_damaged_pack_is_refused_not_trusted(tmp_path: Path) -> None:
    _url, key = await make_vault(tmp_path)
    data = bytes(range(256)) * (4 * BLOCK // 256)
    vault = await open_vault(tmp_path / "vault", key)
    try:
        point = await write_full_point(vault, data)
        pack = next((tmp_path / "vault" / "packs").rglob("*"))
        while pack.is_dir():
            pack = next(pack.iterdir())
        raw = bytearray(pack.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        pack.write_bytes(bytes(raw))
        with pytest.raises(IntegrityError):
            await point_fingerprints(vault, point, "sda", index=await vault.load_index())
    finally:
        await vault.close()
