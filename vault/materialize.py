"""Materialize a recovery point's disk to a raw image (sparse: zero blocks are holes).

Cost is O(disk size): the map is resolved from at most one full map and a bounded
chain of deltas. Blocks are fetched pack by pack with bounded concurrency,
authenticated, checked against their ids, and written; the disk digest is then
compared with the one the agent recorded. A file is written as ``<out>.partial``,
renamed only when everything verified and removed when anything failed: wrong
data is never left under the requested name. A block device is written in place
(it cannot be renamed); a failure there raises, and the device must not be used.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Executor

from vault import names
from vault.digest import DiskDigest, block_count, fingerprint
from vault.errors import IntegrityError, NotFoundError, PermanentStoreError
from vault.index import Index, Location
from vault.pack import open_block
from vault.point import Point
from vault.repo import Vault

MAX_INFLIGHT = 4
Progress = Callable[[int, int], None]


async def materialize(
    vault: Vault,
    point: Point,
    disk: str,
    out: str,
    *,
    index: Index,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> str:
    """Write ``disk`` of ``point`` to ``out``; return the verified disk digest."""
    entry = point.disk(disk)
    bmap = await vault.resolve_map(point, disk)
    size, bs = entry.size, entry.block_size
    nblocks = block_count(size, bs)
    by_pack: dict[str, list[tuple[int, bytes, Location]]] = defaultdict(list)
    for n, bid in bmap.blocks.items():
        loc = index.entries.get(bid)
        if loc is None:
            raise IntegrityError(f"points/{point.id}",
                                 f"block {n} of disk {disk!r} is in no index")
        by_pack[loc.pack_id].append((n, bid, loc))

    is_device = os.path.exists(out) and stat.S_ISBLK(os.stat(out).st_mode)
    target = out if is_device else out + ".partial"
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    fps: dict[int, bytes] = {}
    loop = asyncio.get_running_loop()
    done_bytes = 0
    try:
        if is_device:
            zero = bytes(bs)
            for n in range(nblocks):
                if n not in bmap.blocks:
                    ln = min(bs, size - n * bs)
                    os.pwrite(fd, zero[:ln], n * bs)
        else:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        sem = asyncio.Semaphore(MAX_INFLIGHT)

        async def one_pack(pack_id: str, items: list[tuple[int, bytes, Location]]) -> None:
            nonlocal done_bytes
            async with sem:
                lo = min(loc.offset for _, _, loc in items)
                hi = max(loc.offset + loc.length for _, _, loc in items)
                pname = names.pack_name(pack_id)
                try:
                    raw = await vault.store.get(pname, lo, hi - lo)
                except NotFoundError:
                    raise IntegrityError(pname, "the pack is missing") from None
                except PermanentStoreError:
                    raise IntegrityError(pname, "the pack is shorter than its index says "
                                                "(truncated)") from None
                got = await loop.run_in_executor(executor, _write_blocks, vault, pack_id, items,
                                                 raw, lo, fd, bs)
                fps.update(got)
                done_bytes += len(items) * bs
                if progress is not None:
                    progress(min(done_bytes, size), size)

        await asyncio.gather(*(one_pack(p, items) for p, items in by_pack.items()))
        os.fsync(fd)
    except BaseException:
        if not is_device:
            os.unlink(target)
        raise
    finally:
        os.close(fd)

    digest = DiskDigest()
    zero_fp = fingerprint(bytes(bs))
    for n in range(nblocks):
        fp = fps.get(n)
        if fp is None:
            ln = min(bs, size - n * bs)
            fp = zero_fp if ln == bs else fingerprint(bytes(ln))
        digest.update(fp)
    got_digest = digest.hexdigest()
    if got_digest != entry.digest:
        if not is_device:
            os.unlink(target)
        raise IntegrityError(
            f"points/{point.id}",
            f"disk {disk!r} restored to digest {got_digest[:16]}, recorded {entry.digest[:16]}",
        )
    if not is_device:
        os.replace(target, out)
        dfd = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename is what says "verified": make it durable
        finally:
            os.close(dfd)
    if progress is not None:
        progress(size, size)
    return got_digest


def _write_blocks(
    vault: Vault, pack_id: str, items: list[tuple[int, bytes, Location]], raw: bytes,
    base: int, fd: int, bs: int,
) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    view = memoryview(raw)
    for n, bid, loc in items:
        data = open_block(vault.keyring, pack_id, bid,
                          view[loc.offset - base: loc.offset - base + loc.length])
        os.pwrite(fd, data, n * bs)
        out[n] = fingerprint(data)
    return out
