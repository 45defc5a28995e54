"""``restore --in-place``: a disk repaired from a recovery point by writing only the blocks
that differ (vault/inplace.py), on ext4 on a loop device changed after the point and on an
image file; a mounted disk, or an image a loop device holds, is refused and unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from common.devicebusy import DeviceInUseError
from tests.backends import missing_backend
from tests.helpers import BLOCK, make_vault, open_vault, run_cli, write_full_point
from vault.inplace import repair_in_place
from vault.point import Point

pytestmark = pytest.mark.root
IMAGE = 24 << 20


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _differing_blocks(a: bytes, b: bytes) -> int:
    return sum(a[o:o + BLOCK] != b[o:o + BLOCK] for o in range(0, max(len(a), len(b)), BLOCK))


@dataclass
class Disk:
    tmp: Path
    vault_url: str
    key: Path
    image: Path
    dev: str
    original: bytes  # the disk at the point
    point: Point


@pytest.fixture(scope="module")
def loop_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    if os.geteuid() != 0:
        missing_backend("root (loop devices, mount)", "run the suite as root")
    for tool in ("losetup", "mkfs.ext4", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs e2fsprogs and util-linux")
    tmp = tmp_path_factory.mktemp("inplace")
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE)
    # No lazy initialisation: nothing writes to the mounted filesystem behind the test.
    _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
    dev = _run("losetup", "--find", "--show", str(image))
    try:
        yield tmp, image, dev
    finally:
        subprocess.run(["umount", str(tmp / "mnt")], capture_output=True)
        subprocess.run(["losetup", "--detach", dev], check=False)


def _mount(dev: str, where: Path) -> None:
    where.mkdir(exist_ok=True)
    _run("mount", "-o", "noatime", dev, str(where))


def _umount(where: Path) -> None:
    _run("umount", str(where))
    os.sync()  # what the unmount wrote reaches the image before anything reads it


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def disk(loop_image: tuple[Path, Path, str]) -> AsyncIterator[Disk]:
    tmp, image, dev = loop_image
    mnt = tmp / "mnt"
    _mount(dev, mnt)
    try:
        for i in range(6):
            (mnt / f"file{i}").write_bytes(os.urandom(300_000 + i * 70_000))
    finally:
        _umount(mnt)
    url, key = await make_vault(tmp)
    original = image.read_bytes()
    v = await open_vault(tmp / "vault", key)
    try:
        point = await write_full_point(v, original, machine="m1")
    finally:
        await v.close()
    yield Disk(tmp, url, key, image, dev, original, point)


def _read_dev(dev: str) -> bytes:
    with open(dev, "rb") as f:
        return f.read(IMAGE)


def test_changed_ext4_device_is_repaired_writing_only_the_changed_blocks(disk: Disk) -> None:
    mnt = disk.tmp / "mnt"
    _mount(disk.dev, mnt)
    try:
        (mnt / "file1").unlink()
        (mnt / "new").write_bytes(os.urandom(500_000))
        with open(mnt / "file3", "r+b") as f:
            f.seek(100_000)
            f.write(os.urandom(10_000))
    finally:
        _umount(mnt)
    changed = _read_dev(disk.dev)
    expected = _differing_blocks(disk.original, changed)
    assert expected > 0

    r = run_cli("restore", "--vault", disk.vault_url, "--key-file", str(disk.key),
                "--point", disk.point.id[:12], "--in-place", disk.dev, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["blocks_compared"] == IMAGE // BLOCK
    assert out["blocks_written"] == expected
    assert out["bytes_written"] == expected * BLOCK
    assert out["digest"] == disk.point.disk("sda").digest
    assert _read_dev(disk.dev) == disk.original
    fsck = subprocess.run(["e2fsck", "-fn", disk.dev], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_mounted_device_is_refused_and_unchanged(disk: Disk) -> None:
    mnt = disk.tmp / "mnt"
    _mount(disk.dev, mnt)
    try:
        (mnt / "file0").write_bytes(b"written while mounted")
        os.sync()
        before = _read_dev(disk.dev)
        r = run_cli("restore", "--vault", disk.vault_url, "--key-file", str(disk.key),
                    "--in-place", disk.dev)
        after = _read_dev(disk.dev)
    finally:
        _umount(mnt)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{disk.dev} is in use: it is mounted at {mnt}" in r.stderr
    assert "nothing was written" in r.stderr
    assert after == before
    assert before != disk.original


@pytest.mark.asyncio(loop_scope="module")
async def test_image_file_repaired_in_place_and_an_attached_image_refused(
        disk: Disk) -> None:
    v = await open_vault(disk.tmp / "vault", disk.key)
    try:
        index = await v.load_index()
        # The image a loop device is attached to: refused before anything is read.
        _run("blockdev", "--flushbufs", disk.dev)
        before = disk.image.read_bytes()
        with pytest.raises(DeviceInUseError, match=f"attached to {disk.dev}"):
            await repair_in_place(v, disk.point, "sda", str(disk.image), index=index)
        assert disk.image.read_bytes() == before

        # A copy, damaged: blocks overwritten, a data block zeroed, a zero block written,
        # and the file cut short.
        copy = disk.tmp / "copy.img"
        damaged = bytearray(disk.original)
        data_blocks = [n for n in range(IMAGE // BLOCK)
                       if any(disk.original[n * BLOCK:(n + 1) * BLOCK])]
        zero_block = next(n for n in range(IMAGE // BLOCK) if n not in set(data_blocks))
        damaged[data_blocks[3] * BLOCK:data_blocks[3] * BLOCK + 7] = b"damaged"
        damaged[data_blocks[5] * BLOCK:(data_blocks[5] + 1) * BLOCK] = bytes(BLOCK)
        damaged[zero_block * BLOCK + 100] = 1
        damaged = damaged[:IMAGE - 3 * BLOCK]
        copy.write_bytes(damaged)
        expected = _differing_blocks(disk.original, bytes(damaged) + bytes(3 * BLOCK))
        seen: list[tuple[str, int, int]] = []
        r = await repair_in_place(v, disk.point, "sda", str(copy), index=index,
                                  progress=lambda *a: seen.append(a))
        assert r.blocks_written == expected
        assert copy.read_bytes() == disk.original
        assert seen[-1] == ("write", r.bytes_written, r.bytes_written)
        assert ("compare", IMAGE, IMAGE) in seen

        # Run again: nothing differs, nothing is written.
        again = await repair_in_place(v, disk.point, "sda", str(copy), index=index)
        assert (again.blocks_written, again.digest) == (0, r.digest)
    finally:
        await v.close()
