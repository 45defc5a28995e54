"""Materialize a recovery point's disk to a raw image (sparse: zero blocks are holes).

Cost is O(disk size): the map is read from at most one full map and a bounded chain of
deltas. What is held does not grow with the disk beyond the chain's maps (40 bytes a
map entry, vault/mapranges.py): the disk is restored in ranges of ``range_blocks``
block numbers. Each range's block ids are taken from the chain's maps and looked up in
the index in one batch; its packs are read with bounded concurrency (the next range's
reads start while the last of one's finish), each block authenticated, checked against
its id and written, and the range's fingerprints go into the disk digest in block
order; the digest is then compared with the one the agent recorded.

A file is written as ``<out>.partial``, renamed only when everything verified, and
removed (with its journal) when data failed verification: wrong data is never left
under the requested name. Each verified pack of a range is noted, after an fdatasync,
in ``<out>.partial.progress``, and each whole range after its packs
(vault/restorejournal.py); an interrupted restore run again skips what was noted, redoes
the rest and still checks the whole digest. A block device is written in place (it
cannot be renamed); a failure there raises, and the device must not be used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import stat
from collections import deque
from collections.abc import Callable, Container
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from common.digest import DiskDigest, block_count, fingerprint
from vault import names, restorejournal
from vault.crypto import Keyring
from vault.errors import IntegrityError, UnindexedBlocksError
from vault.index import BlockIndex, Location
from vault.mapchain import chain_entries
from vault.mapranges import RANGE_BLOCKS, ChainRanges
from vault.packrange import open_span, read_span
from vault.point import Point
from vault.repo import Vault
from vault.restorejournal import Journal, Resumed, ZeroFingerprints, place

MAX_INFLIGHT = 4  # pack reads at once
WINDOW = 2  # ranges in flight
T = TypeVar("T")
Progress = Callable[[int, int], None]
Item = tuple[int, bytes, Location]  # block number, id, where it is


async def materialize(
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
    """Write ``disk`` of ``point`` to ``out``; return the verified disk digest."""
    if range_blocks < 1:
        raise ValueError(f"a range is at least one block, not {range_blocks}")
    entry = point.disk(disk)
    size, bs = entry.size, entry.block_size
    chain = ChainRanges(await chain_entries(vault, point, disk), block_count(size, bs))
    zeros = ZeroFingerprints(size, bs)

    is_device = os.path.exists(out) and stat.S_ISBLK(os.stat(out).st_mode)
    target = out if is_device else out + ".partial"
    journal_path = None if is_device else target + ".progress"
    header: dict[str, object] = {
        "format": restorejournal.FORMAT, "point": point.id, "disk": disk, "size": size,
        "block_size": bs, "range_blocks": range_blocks}
    resumed = None
    if journal_path is not None and os.path.exists(target) and os.path.exists(journal_path):
        resumed = restorejournal.read(journal_path, header, zeros, range_blocks)
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    run = _Run(vault, index, executor, fd, zeros, progress,
               names.POINTS + point.id, disk, zero_fill=is_device)
    try:
        if not is_device and resumed is None:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        if journal_path is not None:
            run.journal = Journal(journal_path, header, new=resumed is None)
        got_digest = await run.ranges(chain, resumed or Resumed(DiskDigest(), 0), range_blocks)
        os.fsync(fd)
    except IntegrityError:
        run.wait()
        _discard(target, journal_path, is_device)
        raise
    finally:
        # Worker threads cannot be cancelled: never close the fd under one.
        run.wait()
        os.close(fd)
        if run.journal is not None:
            run.journal.close()

    if got_digest != entry.digest:
        _discard(target, journal_path, is_device)
        raise IntegrityError(
            f"points/{point.id}",
            f"disk {disk!r} restored to digest {got_digest[:16]}, recorded {entry.digest[:16]}",
        )
    if not is_device:
        os.replace(target, out)
        if journal_path is not None:
            os.unlink(journal_path)
        dfd = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename is what says "verified": make it durable
        finally:
            os.close(dfd)
    if progress is not None:
        progress(size, size)
    return got_digest


@dataclass
class _Range:
    """One range of block numbers being restored."""

    first: int
    end: int
    mapped: int  # its non-zero blocks
    by_pack: dict[str, list[Item]]  # the packs still to read, their blocks in block order
    fps: bytearray  # its fingerprints, filled in as packs are written
    task: asyncio.Future[list[BaseException | None]] | None = field(default=None)


class _Run:
    """One restore's ranges, packs and threads (``materialize``)."""

    def __init__(self, vault: Vault, index: BlockIndex, executor: Executor | None, fd: int,
                 zeros: ZeroFingerprints, progress: Progress | None, point: str, disk: str,
                 *, zero_fill: bool) -> None:
        self.vault, self.index, self.fd, self.zeros = vault, index, fd, zeros
        self.executor = executor or _default_executor()
        self.progress, self.point, self.disk, self.zero_fill = progress, point, disk, zero_fill
        self.journal: Journal | None = None
        self.threads: set[concurrent.futures.Future[Any]] = set()
        self.loop = asyncio.get_running_loop()
        self.sem = asyncio.Semaphore(MAX_INFLIGHT)
        self.failed = False
        self.done_bytes = 0

    def in_thread(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        cf = self.executor.submit(fn, *args)
        self.threads.add(cf)
        cf.add_done_callback(self.threads.discard)
        return asyncio.wrap_future(cf, loop=self.loop)

    def wait(self) -> None:
        concurrent.futures.wait(set(self.threads))

    async def ranges(self, chain: ChainRanges, resumed: Resumed, span: int) -> str:
        """Restore every range not done yet, in order; the disk digest."""
        digest, start, nblocks = resumed.digest, resumed.next_first, self.zeros.nblocks
        bs = self.zeros.block_size
        self.done_bytes = start * bs + bs * sum(
            len(fps) for packs in resumed.packs.values() for fps in packs.values())
        await chain.skip(start)
        inflight: deque[_Range] = deque()
        try:
            for first in range(start, nblocks, span):
                await chain.load(min(nblocks, first + span))
                rng = await self.in_thread(self._prepare, chain, first,
                                           min(nblocks, first + span),
                                           resumed.packs.pop(first, {}))
                rng.task = asyncio.ensure_future(self._reads(rng))
                inflight.append(rng)
                if len(inflight) >= WINDOW:
                    await self._finish(inflight, digest)
            while inflight:
                await self._finish(inflight, digest)
        except BaseException as e:
            # After a failure no new pack starts, but those in flight finish and are
            # noted, so a later run resumes from them; nothing runs on once this returns.
            self.failed = True
            tasks = [r.task for r in inflight if r.task is not None]
            if isinstance(e, asyncio.CancelledError):
                for t in tasks:
                    t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            if not isinstance(e, IntegrityError | asyncio.CancelledError):
                for r in results:
                    bad = [x for x in r if isinstance(x, IntegrityError)] if isinstance(
                        r, list) else []
                    if bad:
                        raise bad[0] from None  # damage outweighs an outage
            raise
        return digest.hexdigest()

    async def _finish(self, inflight: deque[_Range], digest: DiskDigest) -> None:
        """The oldest range in flight, once its packs are all written: into the digest,
        in order, and noted."""
        rng = inflight[0]
        assert rng.task is not None
        results = await rng.task
        inflight.popleft()
        errors = [r for r in results if r is not None]
        if errors:
            raise next((e for e in errors if isinstance(e, IntegrityError)), errors[0])
        digest.update(bytes(rng.fps))
        if self.journal is not None:
            self.journal.done(rng.first)
        self._advanced((rng.end - rng.first - rng.mapped) * self.zeros.block_size)

    def _advanced(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        if self.progress is not None:
            self.progress(min(self.done_bytes, self.zeros.size), self.zeros.size)

    def _prepare(self, chain: ChainRanges, first: int, end: int,
                 noted: dict[str, dict[int, bytes]]) -> _Range:
        """(In a thread.) The range's blocks, located in one batch, grouped by pack; the
        packs an earlier run noted are taken as done."""
        ids = chain.blocks(first, end)
        found = self.index.lookup(set(ids.values()))
        by_pack: dict[str, list[Item]] = {}
        missing: list[int] = []
        for n in sorted(ids):
            bid = ids[n]
            loc = found.get(bid)
            if loc is None:
                missing.append(n)
            else:
                by_pack.setdefault(loc.pack_id, []).append((n, bid, loc))
        if missing:
            raise UnindexedBlocksError(self.point, self.disk, len(missing), missing[0])
        fps = self.zeros.range(first, end)
        for pack_id, got in noted.items():
            items = by_pack.get(pack_id)
            if items is not None and got.keys() == {n for n, _, _ in items}:
                place(fps, first, got)
                del by_pack[pack_id]
        if self.zero_fill:
            _zero_fill(self.fd, first, end, ids.keys(), self.zeros)
        return _Range(first, end, len(ids), by_pack, fps)

    async def _reads(self, rng: _Range) -> list[BaseException | None]:
        """Read and write the range's packs; the error of each (``None``: done)."""
        async def one(pack_id: str, items: list[Item]) -> BaseException | None:
            async with self.sem:
                if self.failed:
                    return None
                try:
                    await self._pack(rng, pack_id, items)
                except Exception as e:
                    self.failed = True
                    return e
                return None
        return list(await asyncio.gather(*(one(p, items) for p, items in rng.by_pack.items())))

    async def _pack(self, rng: _Range, pack_id: str, items: list[Item]) -> None:
        raw, lo = await read_span(self.vault.store, pack_id, items)
        got = await self.in_thread(_write_blocks, self.vault.keyring, pack_id, items, raw, lo,
                                   self.fd, self.zeros.block_size)
        del raw
        place(rng.fps, rng.first, got)
        if self.journal is not None:
            # Durable data first, then the note that says so.
            await self.in_thread(os.fdatasync, self.fd)
            self.journal.pack(rng.first, pack_id, got)
        self._advanced(len(items) * self.zeros.block_size)


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


def _zero_fill(fd: int, first: int, end: int, mapped: Container[int],
               zeros: ZeroFingerprints) -> None:
    """Write zeros over the blocks of ``[first, end)`` not in ``mapped`` (a device is not
    sparse), up to 1 MiB a write."""
    bs, size = zeros.block_size, zeros.size
    chunk = max(1, (1 << 20) // bs)
    zero = bytes(chunk * bs)
    n = first
    while n < end:
        if n in mapped:
            n += 1
            continue
        run = n
        while run < end and run - n < chunk and run not in mapped:
            run += 1
        stop = min(run * bs, size)
        os.pwrite(fd, zero[:stop - n * bs], n * bs)
        n = run


def _write_blocks(keyring: Keyring, pack_id: str, items: list[Item], raw: bytes, base: int,
                  fd: int, bs: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for n, data in open_span(keyring, pack_id, items, raw, base):
        os.pwrite(fd, data, n * bs)
        out[n] = fingerprint(data)
    return out
