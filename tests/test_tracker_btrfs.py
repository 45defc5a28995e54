"""The reflink extent diff on a real Btrfs on a loop device, with and without
``compress=zstd``.

Btrfs maps a file unlike XFS: compressed data sits in extents of at most 128 KiB
whose reported location is the whole compressed extent's, whichever piece of it the
file still uses; a write splits them, and a sub-page write is a new extent of its own.
The image is written in place between cycles (page cache, no fsync) — scattered
writes of 1 byte to 192 KiB, compressible and not, writes into holes, a truncate and
extend back — and every point is restored from the vault and compared byte for byte.
The bytes each cycle read are counted: nothing for an unchanged image, and for a
changed one no more than the blocks the writes touched (with compression: widened by
one compressed extent on each side, the pieces around a write are read whole).
The extent maps themselves: more extents than one FIEMAP call returns, compared
whole; a small file's inline data is always read.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mobility.agent import Agent, provider_for
from mobility.fiemap import (
    BATCH,
    FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_ENCODED,
    Extent,
    block_ranges,
    comparable,
    differing,
    file_extents,
)
from mobility.snapshot import reflink_clone
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import BLOCK, Pki, make_disk
from tests.test_ext4 import loop_device, mounted
from tests.test_tracker_reflink import cycle, kept, reflink_config

BTRFS_IMAGE = 256 << 20  # mkfs.btrfs wants at least 114 MB
DISK = 16 << 20
COMPRESSED = 128 << 10  # Btrfs's largest compressed extent (uncompressed bytes)
K = 4096


@contextmanager
def btrfs_device(image: Path, size: int) -> Iterator[str]:
    """A fresh Btrfs on a loop device over a sparse ``image``; the device's path. The
    kernel forgets the device again before it is detached."""
    if os.geteuid() != 0:
        missing_backend("root (loop devices, mount)", "run the suite as root")
    if shutil.which("mkfs.btrfs") is None:
        missing_backend("mkfs.btrfs", "tests/run.sh installs btrfs-progs")
    with open(image, "wb") as f:
        f.truncate(size)
    with loop_device(image) as dev:
        try:
            subprocess.run(["mkfs.btrfs", "-f", "-q", dev], check=True,
                           stdout=subprocess.DEVNULL)
            yield dev
        finally:
            subprocess.run(["btrfs", "device", "scan", "--forget", dev], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(params=["plain", "zstd"])
def btrfs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A mounted Btrfs, without compression or with ``compress=zstd``."""
    options = ["-o", "compress=zstd"] if request.param == "zstd" else []
    with btrfs_device(tmp_path / "btrfs.img", BTRFS_IMAGE) as dev, \
            mounted(dev, tmp_path / "mnt", *options) as mnt:
        yield mnt


def compressed(where: Path) -> bool:
    return "compress=zstd" in next(line for line in Path("/proc/self/mounts").read_text()
                                   .splitlines() if f" {where} " in line)


def compress_always(image: Path) -> None:
    """The image's own compression property: every compressible write is compressed,
    not only those before Btrfs's first incompressible one (after which the mount
    option alone gives up on the file), so compressed data overwrites compressed."""
    subprocess.run(["btrfs", "property", "set", str(image), "compression", "zstd"],
                   check=True)


def encoded_extents(image: Path) -> list[Extent]:
    return [e for e in file_extents(str(image), DISK) if e.flags & FIEMAP_EXTENT_ENCODED]


def text(rng: random.Random, n: int) -> bytes:
    """``n`` bytes that compress well (zstd makes encoded extents of them)."""
    words = [rng.randbytes(rng.randint(2, 6)).hex().encode() for _ in range(64)]
    return b" ".join(rng.choices(words, k=n // 4 + 1))[:n]


def scatter(disk: Path, rng: random.Random, n: int) -> list[tuple[int, int]]:
    """``n`` writes in place at random offsets (sizes from 1 byte to 3 blocks, half of
    them compressible); the byte ranges written."""
    out = []
    with open(disk, "r+b") as f:
        for i in range(n):
            size = rng.choice([1, 100, K - 1, K, 20_000, BLOCK, 3 * BLOCK])
            at = rng.randrange(0, DISK - size)
            f.seek(at)
            f.write(text(rng, size) if i % 2 else rng.randbytes(size))
            out.append((at, at + size))
    return out


def holes(disk: Path) -> list[tuple[int, int]]:
    """The holes of the file ``disk`` (``SEEK_HOLE``/``SEEK_DATA``)."""
    out = []
    fd = os.open(disk, os.O_RDONLY)
    try:
        pos = 0
        while pos < DISK:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= DISK:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:  # ENXIO: a hole to the end
                data = DISK
            out.append((hole, data))
            pos = data
    finally:
        os.close(fd)
    return out


def bound(written: list[tuple[int, int]], widen: int) -> int:
    """The bytes of the blocks that ``written``, each widened by ``widen`` bytes on
    both sides, touches."""
    wide = sorted((max(0, lo - widen), min(DISK, hi + widen)) for lo, hi in written)
    return sum(end - first for first, end in block_ranges(wide, BLOCK)) * BLOCK


@pytest.mark.root
async def test_every_point_is_exact_and_only_what_changed_is_read(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        btrfs: Path) -> None:
    disk = btrfs / "vm.img"
    make_disk(disk, DISK, seed=1)  # holes, random data and text
    key, rng = vault_at[1], random.Random(5)
    widen = COMPRESSED if compressed(btrfs) else 0
    if widen:
        compress_always(disk)
    agent = Agent(cfg := reflink_config(tmp_path, pki, procserver.port, disk),
                  provider=provider_for(cfg))
    try:
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert (r.kind, r.tracking, r.fallbacks) == ("full", {"sda": "scan"}, {})
        assert len(kept(btrfs)) == 1
        encoded = encoded_extents(disk)
        assert bool(encoded) == bool(widen)  # compressed extents exactly with zstd

        for _ in range(2):
            written = scatter(disk, rng, 24)
            if widen:  # compressed data written over compressed data
                now = encoded_extents(disk)
                assert set(now) - set(encoded)
                encoded = now
            r = await cycle(agent, procserver, tmp_path, key, disk)
            assert (r.kind, r.tracking, r.fallbacks) == ("delta", {"sda": "reflink"}, {})
            assert 0 < r.bytes_read <= bound(written, widen) < DISK // 2

        r = await cycle(agent, procserver, tmp_path, key, disk)  # nothing written
        assert (r.tracking, r.bytes_read, r.blocks_sent) == ({"sda": "reflink"}, 0, 0)

        # Into holes: a byte, a sub-page write in the middle, a block and a bit at the
        # start of another.
        gaps = [h for h in holes(disk) if h[1] - h[0] >= 4 * BLOCK]
        assert len(gaps) >= 3
        written = [(gaps[0][0] + 12_345, gaps[0][0] + 12_346),
                   (gaps[1][0] + BLOCK + 5, gaps[1][0] + BLOCK + 3005),
                   (gaps[2][0], gaps[2][0] + BLOCK + 7)]
        with open(disk, "r+b") as f:
            for lo, hi in written:
                f.seek(lo)
                f.write(text(rng, hi - lo))
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert r.tracking == {"sda": "reflink"}
        assert 0 < r.bytes_read <= bound(written, widen)

        # Cut short and extended back: the tail reads as zeros now.
        cut = DISK - (3 << 20) + 12_345
        os.truncate(disk, cut)
        os.truncate(disk, DISK)
        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert r.tracking == {"sda": "reflink"}
        assert r.bytes_read <= bound([(cut, DISK)], widen)

        r = await cycle(agent, procserver, tmp_path, key, disk)
        assert (r.tracking, r.bytes_read, r.blocks_sent) == ({"sda": "reflink"}, 0, 0)
        assert len(kept(btrfs)) == 2
    finally:
        agent.close()


@pytest.mark.root
def test_extent_maps_of_many_split_extents_are_read_whole_and_compared(btrfs: Path) -> None:
    # More extents than one FIEMAP call returns (BATCH): a clone's source (compressible
    # text: encoded extents with zstd) gets every 4th 4 KiB page of all but its last MiB
    # rewritten, so its extents are split around each write.
    image, clone = btrfs / "frag.img", btrfs / "frag.clone"
    size, rng = (24 << 20) + 5 * K, random.Random(9)
    with open(image, "wb") as f:
        f.write(text(rng, size))
    reflink_clone(str(image), str(clone))
    pages = range(3, (size - (1 << 20)) // K, 4)
    fd = os.open(image, os.O_WRONLY)
    try:
        for n in pages:
            os.pwrite(fd, rng.randbytes(K), n * K)
        os.fsync(fd)
    finally:
        os.close(fd)
    new, old = file_extents(str(image), size), file_extents(str(clone), size)
    assert len(new) > BATCH and all(comparable(e) for e in old + new)
    diff = differing(old, new, size)
    changed = {n for lo, hi in diff for n in range(lo // K, -(-hi // K))}
    assert changed >= set(pages)  # never a write missed
    # The untouched end: at most the compressed extent around the last write is read.
    assert max(changed) < pages[-1] + COMPRESSED // K
    if not compressed(btrfs):
        assert diff == [(n * K, (n + 1) * K) for n in pages]
    assert differing(old, file_extents(str(clone), size), size) == []
    assert differing(new, file_extents(str(image), size), size) == []


@pytest.mark.root
def test_inline_data_is_read_never_taken_as_unchanged(btrfs: Path) -> None:
    # A small file's data lives in Btrfs's metadata (FIEMAP_EXTENT_DATA_INLINE, with
    # zstd also ENCODED): its "location" says nothing, so even a clone of it is read.
    small, clone = btrfs / "small.img", btrfs / "small.clone"
    small.write_bytes(text(random.Random(3), 1000))
    reflink_clone(str(small), str(clone))
    a, b = file_extents(str(small), 1000), file_extents(str(clone), 1000)
    assert [e.flags & FIEMAP_EXTENT_DATA_INLINE for e in a + b] == [
        FIEMAP_EXTENT_DATA_INLINE] * 2
    assert not any(comparable(e) for e in a + b)
    assert differing(a, b, 1000) == differing(a, a, 1000) == [(0, 1000)]
