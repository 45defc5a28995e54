"""A recovery point written from disk images read on the host: what a failback takes of
a recovered machine whose disks are image files (the folder target), without an agent
inside it.

Each image is read block by block. With a ``base`` point that has the same disk (size
and block size), only the blocks whose keyed id differs from the base's map are stored,
as a delta on it (the recovered machine started from that point, so this costs the
writes made since); otherwise the disk is stored whole. The disk digest is computed
from every block, as an agent computes it, so the point verifies like any other.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from common.digest import block_count, digest_of_fingerprint_map, fingerprint, is_zero
from vault.point import Point
from vault.repo import Vault
from vault.writer import CycleWriter, DiskSpec

READ_CHUNK = 8 << 20
BATCH = 64  # blocks handed to the writer at once


@dataclass(frozen=True)
class ImageDisk:
    name: str
    path: str


@dataclass(frozen=True)
class ImagePoint:
    point: Point
    blocks_stored: int  # blocks that differed from the base (all non-zero ones if none)
    full: bool


def _size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


async def point_from_images(
    vault: Vault, executor: Executor, *, machine: str, cycle: str, disks: list[ImageDisk],
    block_size: int, base: Point | None, consistency: str = "crash",
    progress: Callable[[int, int], None] | None = None,
) -> ImagePoint:
    """Write ``disks`` as one point of ``machine`` (a delta on ``base`` when every disk
    matches it, else full); the point and how many blocks were stored."""
    sizes = {d.name: _size(d.path) for d in disks}
    same = base is not None and all(
        any(e.disk == d.name and e.size == sizes[d.name] and e.block_size == block_size
            for e in base.disks) for d in disks)
    maps: dict[str, dict[int, bytes]] = {}
    if same:
        assert base is not None
        for d in disks:
            maps[d.name] = (await vault.resolve_map(base, d.name)).blocks
    specs = [DiskSpec(d.name, sizes[d.name], block_size) for d in disks]
    writer = CycleWriter(vault, await vault.load_index(), executor, machine=machine,
                         cycle=cycle, disks=specs, full=not same,
                         base=base if same else None)
    loop = asyncio.get_running_loop()
    digests: dict[str, str] = {}
    stored = 0
    total, done = sum(sizes.values()), 0
    try:
        for idx, d in enumerate(disks):
            size = sizes[d.name]
            n = block_count(size, block_size)
            old = maps.get(d.name)
            fps = bytearray()
            fd = os.open(d.path, os.O_RDONLY)
            try:
                chunk = max(1, READ_CHUNK // block_size)
                for first in range(0, n, chunk):
                    last = min(n, first + chunk)
                    changed, part = await loop.run_in_executor(
                        executor, _read, vault, fd, first, last, size, block_size, old)
                    fps += part
                    for i in range(0, len(changed), BATCH):
                        await writer.add([(idx, b, data) for b, data in changed[i:i + BATCH]])
                    stored += len(changed)
                    done += min(size, last * block_size) - first * block_size
                    if progress is not None:
                        progress(done, total)
            finally:
                os.close(fd)
            digests[d.name] = digest_of_fingerprint_map(fps)
        point = await writer.finish(digests, consistency)
    except BaseException:
        await writer.abort()
        raise
    return ImagePoint(point, stored, not same)


def _read(vault: Vault, fd: int, first: int, last: int, size: int, bs: int,
          old: dict[int, bytes] | None) -> tuple[list[tuple[int, bytes | None]], bytes]:
    """The blocks first..last-1 to store (None: now zero) and their fingerprints."""
    lo, hi = first * bs, min(size, last * bs)
    data = os.pread(fd, hi - lo, lo)
    if len(data) < hi - lo:
        data += bytes(hi - lo - len(data))
    out: list[tuple[int, bytes | None]] = []
    fps = bytearray()
    for n in range(first, last):
        b = data[(n - first) * bs:min(hi, (n + 1) * bs) - lo]
        fps += fingerprint(b)
        zero = is_zero(b)
        if old is None:
            if not zero:
                out.append((n, b))
            continue
        want = old.get(n)
        if zero:
            if want is not None:
                out.append((n, None))
        elif want is None or vault.keyring.block_id(b) != want:
            out.append((n, b))
    return out, bytes(fps)
