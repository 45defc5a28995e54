"""vault/restore.py: a whole point into a folder, as restore and a folder target use it."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import make_vault, open_vault, write_full_point
from vault.restore import RestoredDisk, restore_point

DATA = bytes(range(256)) * 700  # 179200 bytes: a short last block


async def test_every_disk_verified_into_the_folder(tmp_path: Path) -> None:
    _url, key = await make_vault(tmp_path)
    v = await open_vault(tmp_path / "vault", key)
    try:
        p = await write_full_point(v, DATA)
        seen: list[str] = []

        def progress(disk: str) -> None:
            seen.append(disk)

        out = tmp_path / "a" / "b"
        (got,) = await restore_point(v, p, out, progress=progress)
        assert got == RestoredDisk("sda", str(out / "sda.img"), len(DATA), p.disk("sda").digest)
        assert (out / "sda.img").read_bytes() == DATA and seen == ["sda"]

        assert await restore_point(v, p, tmp_path / "none", disks=["sdb"]) == []
        assert list((tmp_path / "none").iterdir()) == []

        (vhd,) = await restore_point(v, p, tmp_path / "v", fmt="vhd", disks=["sda"])
        assert vhd.path == str(tmp_path / "v" / "sda.vhd") and vhd.digest == got.digest
        assert (tmp_path / "v" / "sda.vhd").read_bytes()[:len(DATA)] == DATA
    finally:
        await v.close()
