"""``PointDisk``: a recovery point's disk as an NBD export, read from the vault on demand.

A block is read from the local overlay (overlay.py) once present there; otherwise it
is fetched: a byte range of its pack (the block and the point's blocks after it in the
same pack, up to READAHEAD bytes: a guest reading one block mostly reads its
neighbours next) is read from the store, every block in it is authenticated,
decompressed and checked against its id (vault/pack.py), then all of them go into the
overlay. The overlay is the cache: nothing is fetched twice, and two requests for the
same block wait for one fetch.

Writes go to the overlay only; the vault is never written. A write that covers part
of a block not yet present fetches that block first; one that covers whole blocks
needs no fetch. Extents report blocks absent from the point's map (and holes the
client made) as holes that read as zeros.
"""

from __future__ import annotations

import asyncio
import bisect
from concurrent.futures import Executor

import structlog

from common.digest import block_count
from instant import protocol as p
from instant.blocktable import BlockTable, Entry
from instant.overlay import Overlay, OverlayHeader
from vault import names
from vault.errors import UnindexedBlocksError
from vault.index import BlockIndex, Location
from vault.mapchain import chain_entries
from vault.mapranges import RANGE_BLOCKS, ChainRanges
from vault.maps import MapView
from vault.pack import Frames, open_block
from vault.packrange import read_range
from vault.point import Point
from vault.repo import Vault

log = structlog.get_logger("instant.pointdisk")

READAHEAD = 1 << 20  # pack bytes fetched for one block read on demand
MAX_FETCHES = 8  # store reads in flight at once, on-demand and hydration together
MAX_EXTENT_BLOCKS = 1 << 14  # blocks one BLOCK_STATUS reply describes at most


class PointDisk:
    """Open with ``PointDisk.open``; ``close`` stops its fetches and closes the overlay
    (not the vault)."""

    def __init__(self, vault: Vault, point: Point, disk: str, overlay: Overlay,
                 table: BlockTable, executor: Executor) -> None:
        self.vault, self.point, self.disk = vault, point, disk
        self.overlay = overlay
        self._table = table
        self._executor = executor
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._fetch_slots = asyncio.Semaphore(MAX_FETCHES)
        self._tasks: set[asyncio.Task[None]] = set()
        self.fetched_bytes = 0
        # blocks in the point's map (the rest are zeros, present from the overlay's creation)
        self.stored_blocks = table.stored

    @property
    def stored_present(self) -> int:
        """How many of the point's stored blocks are local (fetched, or overwritten)."""
        return max(0, self.overlay.present_count - (self.overlay.nblocks - self.stored_blocks))

    @classmethod
    async def open(cls, vault: Vault, point: Point, disk: str, overlay_dir: str, *,
                   executor: Executor, index: BlockIndex | None = None,
                   range_blocks: int = RANGE_BLOCKS) -> PointDisk:
        """Locate every block of ``disk`` of ``point`` (``index``, or the vault's loaded for
        the purpose and let go after) and open its overlay in ``overlay_dir``. Raises
        KeyError for a disk the point lacks, UnindexedBlocksError / IntegrityError for a
        damaged vault, OverlayMismatch. The disk's maps are gone through ``range_blocks``
        blocks at a time."""
        entry = point.disk(disk)
        nblocks = block_count(entry.size, entry.block_size)
        chain = await chain_entries(vault, point, disk)
        own = index is None
        index = await vault.load_index() if index is None else index
        try:
            table = await _table(chain, nblocks, index, point, disk, range_blocks)
        finally:
            if own:
                index.close()
        del chain, index  # the table is all that is kept
        header = OverlayHeader(point.id, disk, entry.size, entry.block_size)
        zero = (n for n in range(nblocks) if not table.in_map(n))
        loop = asyncio.get_running_loop()
        overlay = await loop.run_in_executor(executor, Overlay.open, overlay_dir, header, zero,
                                             executor)
        return cls(vault, point, disk, overlay, table, executor)

    # -- the Export protocol -----------------------------------------------------
    @property
    def size(self) -> int:
        return self.overlay.size

    @property
    def block_size(self) -> int:
        return self.overlay.block_size

    def _blocks(self, offset: int, length: int) -> range:
        bs = self.block_size
        return range(offset // bs, (offset + length + bs - 1) // bs)

    async def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        await self.ensure(self._blocks(offset, length))
        return await self.overlay.read(offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self._write(offset, data, len(data), fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._write(offset, None, length, fua)

    async def _write(self, offset: int, data: bytes | None, length: int, fua: bool) -> None:
        if length == 0:
            return
        bs, end = self.block_size, offset + length
        whole: list[int] = []
        part: list[int] = []
        for n in self._blocks(offset, length):
            lo, hi = n * bs, min((n + 1) * bs, self.size)
            (whole if offset <= lo and hi <= end else part).append(n)
        await self.ensure(part)
        await self.overlay.write(offset, data, length, mark=whole, sync=fua)

    async def trim(self, offset: int, length: int) -> None:
        # Only whole blocks are trimmed (the protocol lets a trim do less): as zeros.
        bs = self.block_size
        lo = -(-offset // bs) * bs
        hi = min(offset + length, self.size)
        hi = hi if hi == self.size else hi // bs * bs
        if hi > lo:
            await self._write(lo, None, hi - lo, False)

    async def flush(self) -> None:
        await self.overlay.flush()

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        blocks = self._blocks(offset, length)
        end = min(offset + length, (blocks.start + MAX_EXTENT_BLOCKS) * self.block_size)
        # Which blocks are present is read before the image's holes: a block filled in
        # between is then reported as data, never as the hole it was a moment before.
        present = {n for n in range(blocks.start, min(blocks.stop, blocks.start
                                                      + MAX_EXTENT_BLOCKS))
                   if self.overlay.present(n)}
        holes = await self.overlay.zero_runs(offset, end - offset)
        bs = self.block_size
        runs: list[tuple[int, int]] = []  # (length, flags), merged

        def add(n: int, flags: int) -> None:
            if runs and runs[-1][1] == flags:
                runs[-1] = (runs[-1][0] + n, flags)
            else:
                runs.append((n, flags))

        starts = [h[0] for h in holes]
        pos = offset
        while pos < end:
            n = pos // bs
            nxt = min((n + 1) * bs, end)
            if n in present:
                # Present: the image says, hole by hole (a hole reads as zeros).
                i = bisect.bisect_right(starts, pos) - 1
                if i >= 0 and holes[i][0] <= pos < holes[i][1]:
                    stop = min(holes[i][1], nxt)
                    add(stop - pos, p.STATE_HOLE | p.STATE_ZERO)
                else:
                    j = bisect.bisect_right(starts, pos)
                    stop = min(holes[j][0], nxt) if j < len(holes) else nxt
                    add(stop - pos, 0)
                pos = stop
            else:
                add(nxt - pos, 0)  # not fetched yet, and in the map: data
                pos = nxt
        return runs

    # -- fetching ---------------------------------------------------------------
    async def ensure(self, blocks: range | list[int]) -> None:
        """Return once every block of ``blocks`` is present in the overlay."""
        waits: list[asyncio.Future[None]] = []
        zeros: list[tuple[int, bytes]] = []
        for n in blocks:
            if self.overlay.present(n):
                continue
            if not self._table.in_map(n):  # zero at the point (its bit was lost)
                zeros.append((n, bytes(min(self.block_size, self.size - n * self.block_size))))
                continue
            fut = self._inflight.get(n)
            if fut is None:
                fut = self._start_fetch(n, READAHEAD)
            waits.append(fut)
        if zeros:
            await self.overlay.fill(zeros)
        for fut in dict.fromkeys(waits):
            await asyncio.shield(fut)

    def _wanted(self, e: Entry) -> bool:
        return any(not self.overlay.present(b) and b not in self._inflight for b in e.blocks)

    def _start_fetch(self, n: int, span: int) -> asyncio.Future[None]:
        t = self._table
        pack, i = t.locate(n)
        lo = t.start(pack, i)
        while i > 0 and t.start(pack, i - 1) == lo:
            i -= 1  # the blocks of one frame (vault/pack.py) come with the bytes read
        chosen = [t.entry(pack, i)]
        for j in range(i + 1, t.count(pack)):
            if t.end(pack, j) - lo > span and t.start(pack, j) != lo:
                break
            e = t.entry(pack, j)
            if self._wanted(e):
                chosen.append(e)
        return self._fetch(chosen)

    def plan_span(self, pack: int, start: int, span: int) -> tuple[int, list[Entry], int]:
        """For hydration: the entries of pack number ``pack`` from position ``start`` on
        whose blocks are missing (and not being fetched), within ``span`` pack bytes.
        Returns the position after the span, the entries, and the pack bytes they span."""
        t = self._table
        lo = t.start(pack, start)
        chosen: list[Entry] = []
        i = start
        while i < t.count(pack) and (i == start or t.end(pack, i) - lo <= span
                                     or t.start(pack, i) == t.start(pack, i - 1)):
            e = t.entry(pack, i)
            if self._wanted(e):
                chosen.append(e)
            i += 1
        nbytes = (max(e.loc.offset + e.loc.length for e in chosen) - chosen[0].loc.offset
                  if chosen else 0)
        return i, chosen, nbytes

    async def fetch(self, entries: list[Entry]) -> None:
        """Fetch ``entries`` (of one pack, from ``plan_span``) into the overlay."""
        if any(self._wanted(e) for e in entries):
            await asyncio.shield(self._fetch(entries))
        await self.ensure([b for e in entries for b in e.blocks])

    def pack_sizes(self) -> list[int]:
        """Per pack number: how many entries of this disk it has (hydration's walk)."""
        return [self._table.count(pack) for pack in range(len(self._table.pack_ids))]

    def _fetch(self, chosen: list[Entry]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        mine = [b for e in chosen for b in e.blocks
                if not self.overlay.present(b) and b not in self._inflight]
        for b in mine:
            self._inflight[b] = fut
        task = asyncio.create_task(self._fetch_into(chosen))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def settle(t: asyncio.Task[None]) -> None:
            for b in mine:
                if self._inflight.get(b) is fut:
                    del self._inflight[b]
            if t.cancelled():
                fut.cancel()
            elif t.exception() is not None:
                fut.set_exception(t.exception())  # type: ignore[arg-type]
            else:
                fut.set_result(None)

        task.add_done_callback(settle)
        # A fetch no one waits for any more must not log "exception never retrieved".
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return fut

    async def _fetch_into(self, chosen: list[Entry]) -> None:
        pack_id = chosen[0].loc.pack_id
        lo = chosen[0].loc.offset
        hi = max(e.loc.offset + e.loc.length for e in chosen)
        async with self._fetch_slots:
            raw = await read_range(self.vault.store, pack_id, lo, hi - lo)
            self.fetched_bytes += len(raw)
            loop = asyncio.get_running_loop()
            blocks = await loop.run_in_executor(self._executor, self._open, pack_id, chosen,
                                                raw, lo)
            await self.overlay.fill(blocks)

    def _open(self, pack_id: str, chosen: list[Entry], raw: bytes, base: int
              ) -> list[tuple[int, bytes]]:
        view = memoryview(raw)
        frames: Frames = {}
        out: list[tuple[int, bytes]] = []
        for e in chosen:
            data = open_block(self.vault.keyring, pack_id, e.block_id,
                              view[e.loc.offset - base:e.loc.offset - base + e.loc.length],
                              frames, e.loc.offset)
            last = self.size - (self.overlay.nblocks - 1) * self.block_size
            for n in e.blocks:
                out.append((n, data[:last] if n == self.overlay.nblocks - 1 else data))
        return out

    async def close(self) -> None:
        """Stop the fetches in flight, then close the overlay."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self.overlay.close()


async def _table(chain: list[MapView], nblocks: int, index: BlockIndex, point: Point,
                 disk: str, span: int) -> BlockTable:
    """Where every block of the disk is: its chain of maps gone through a range at a time
    (vault/mapranges.py), each range's ids looked up in one batch (no dict of the whole
    disk), in a thread. ``UnindexedBlocksError`` if a block is in no index (how many,
    the first)."""
    table = BlockTable(nblocks)
    missing, first_missing = 0, -1

    def add(blocks: dict[int, bytes]) -> tuple[int, int]:
        found = index.lookup(set(blocks.values()))
        located: list[tuple[int, bytes, Location]] = []
        lost, first_lost = 0, -1
        for n, bid in blocks.items():
            loc = found.get(bid)
            if loc is not None:
                located.append((n, bid, loc))
                continue
            if not lost or n < first_lost:  # a range's blocks come in no set order
                first_lost = n
            lost += 1
        table.add(located)
        return lost, first_lost

    async for _first, _end, blocks in ChainRanges(chain, nblocks).walk(span):
        lost, first_lost = await asyncio.to_thread(add, blocks)
        if lost and not missing:
            first_missing = first_lost
        missing += lost
    if missing:
        raise UnindexedBlocksError(names.POINTS + point.id, disk, missing, first_missing)
    await asyncio.to_thread(table.finish)
    return table
