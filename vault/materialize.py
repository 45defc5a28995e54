"""Materialize a recovery point's disk to a raw image (sparse: zero blocks are holes).

Cost is O(disk size): the map is resolved from at most one full map and a bounded
chain of deltas. Blocks are fetched pack by pack with bounded concurrency,
authenticated, checked against their ids, and written; the disk digest is then
compared with the one the agent recorded. A file is written as ``<out>.partial``,
renamed only when everything verified, and removed (with its journal) when data
failed verification: wrong data is never left under the requested name. Each
verified pack is noted, after an fdatasync, in ``<out>.partial.progress``; an
interrupted restore run again skips what was noted and redoes the rest. A block
device is written in place (it cannot be renamed); a failure there raises, and
the device must not be used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import stat
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from common.digest import DiskDigest, block_count, fingerprint
from vault import names
from vault.errors import IntegrityError
from vault.index import BlockIndex, Location, locate_blocks
from vault.pack import open_block
from vault.packrange import read_span
from vault.point import Point
from vault.repo import Vault

MAX_INFLIGHT = 4
T = TypeVar("T")
Progress = Callable[[int, int], None]


async def materialize(
    vault: Vault,
    point: Point,
    disk: str,
    out: str,
    *,
    index: BlockIndex,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> str:
    """Write ``disk`` of ``point`` to ``out``; return the verified disk digest."""
    entry = point.disk(disk)
    bmap = await vault.resolve_map(point, disk)
    size, bs = entry.size, entry.block_size
    nblocks = block_count(size, bs)
    by_pack = locate_blocks(index, names.POINTS + point.id, disk, bmap.blocks)

    is_device = os.path.exists(out) and stat.S_ISBLK(os.stat(out).st_mode)
    target = out if is_device else out + ".partial"
    journal = None if is_device else target + ".progress"
    header = {"point": point.id, "disk": disk, "size": size, "block_size": bs}
    fps: dict[int, bytes] = {}
    done_packs = _resume(target, journal, header, fps)
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    loop = asyncio.get_running_loop()
    done_bytes = sum(len(items) for p, items in by_pack.items() if p in done_packs) * bs
    jf = None
    threads: set[concurrent.futures.Future[Any]] = set()
    try:
        if is_device:
            zero = bytes(bs)
            for n in range(nblocks):
                if n not in bmap.blocks:
                    ln = min(bs, size - n * bs)
                    os.pwrite(fd, zero[:ln], n * bs)
        elif not done_packs:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        if journal is not None:
            jf = open(journal, "a" if done_packs else "w")  # noqa: SIM115 - closed below
            if not done_packs:
                jf.write(json.dumps(header) + "\n")
                jf.flush()
        sem = asyncio.Semaphore(MAX_INFLIGHT)

        def in_thread(fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
            cf = (executor or _default_executor()).submit(fn, *args)
            threads.add(cf)
            cf.add_done_callback(threads.discard)
            return asyncio.wrap_future(cf, loop=loop)

        failed = False

        async def one_pack(pack_id: str, items: list[tuple[int, bytes, Location]]) -> None:
            nonlocal done_bytes, failed
            if pack_id in done_packs:
                return
            async with sem:
                if failed:
                    return
                try:
                    await pack_work(pack_id, items)
                except BaseException:
                    failed = True
                    raise

        async def pack_work(pack_id: str, items: list[tuple[int, bytes, Location]]) -> None:
            nonlocal done_bytes
            raw, lo = await read_span(vault.store, pack_id, items)
            got = await in_thread(_write_blocks, vault, pack_id, items, raw, lo, fd, bs)
            fps.update(got)
            if jf is not None:
                # Durable data first, then the note that says so.
                await in_thread(os.fdatasync, fd)
                jf.write(json.dumps({"pack": pack_id,
                                     "fps": {str(n): fp.hex() for n, fp in got.items()}})
                         + "\n")
                jf.flush()
            done_bytes += len(items) * bs
            if progress is not None:
                progress(min(done_bytes, size), size)

        # After a failure no new pack starts, but those in flight finish and are noted,
        # so a later run resumes from them; nothing runs on once this returns.
        results = await asyncio.gather(*(one_pack(p, items) for p, items in by_pack.items()),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            first = next((e for e in errors if isinstance(e, IntegrityError)), errors[0])
            if isinstance(first, IntegrityError):
                _discard_after(threads, target, journal, is_device)
            raise first
        os.fsync(fd)
    finally:
        # Worker threads cannot be cancelled: never close the fd under one.
        concurrent.futures.wait(threads)
        os.close(fd)
        if jf is not None:
            jf.close()

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
        _discard(target, journal, is_device)
        raise IntegrityError(
            f"points/{point.id}",
            f"disk {disk!r} restored to digest {got_digest[:16]}, recorded {entry.digest[:16]}",
        )
    if not is_device:
        os.replace(target, out)
        if journal is not None:
            os.unlink(journal)
        dfd = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename is what says "verified": make it durable
        finally:
            os.close(dfd)
    if progress is not None:
        progress(size, size)
    return got_digest


def _resume(target: str, journal: str | None, header: dict[str, object],
            fps: dict[int, bytes]) -> set[str]:
    """Packs an interrupted earlier run of this same restore finished (fps filled in)."""
    if journal is None or not (os.path.exists(target) and os.path.exists(journal)):
        return set()
    done: set[str] = set()
    with open(journal) as f:
        lines = f.read().split("\n")
    try:
        if json.loads(lines[0]) != header:
            return set()  # a different point or disk: start over
        for line in lines[1:-1]:  # the last element is "" or a torn line
            rec = json.loads(line)
            fps.update({int(n): bytes.fromhex(fp) for n, fp in rec["fps"].items()})
            done.add(rec["pack"])
    except (ValueError, KeyError, TypeError):
        fps.clear()
        return set()
    return done


def _discard_after(threads: set[concurrent.futures.Future[Any]], target: str,
                   journal: str | None, is_device: bool) -> None:
    concurrent.futures.wait(threads)
    _discard(target, journal, is_device)


_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None


def _default_executor() -> concurrent.futures.Executor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="restore")
    return _EXECUTOR


def _discard(target: str, journal: str | None, is_device: bool) -> None:
    if not is_device:
        for path in (target, journal):
            if path is not None and os.path.exists(path):
                os.unlink(path)


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
