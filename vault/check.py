"""Check a vault: every object authenticates and everything a point needs is there.

Structure (always): the key slots parse and one opens; the config authenticates;
every index object authenticates; every point manifest authenticates; every map a
point references authenticates and matches its manifest entry, every delta chain
resolves (``Vault.resolve_map``) and every block of a resolved map is in the index;
every pack the index names exists, is long enough for its entries, and has a trailer
that authenticates under its name and lists every entry the index gives (a cheap read
of the pack's end that catches swapped packs without reading their blocks). Packs
that no index lists are warnings ("unindexed": a writer crashed between pack and
index, or a prune was interrupted; ``rebuild-index`` or ``prune`` deals with them).

With ``read_data``: every pack (or a deterministic subset) is read, one bounded
chunk at a time; its trailer (if the structural pass did not read it already)
authenticates and agrees with the index; every block
authenticates and hashes to its id; and every point's disks are shown to restore to
their recorded digests, from the blocks' fingerprints, without writing anything.

Problems name the store object at fault; a point that cannot be restored because
of another object's damage is reported too ("unrestorable", naming the cause).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from vault import names
from vault.checkdata import chunks, open_blocks, subset_of
from vault.checkopen import open_for_check
from vault.checkpoints import PointChecks
from vault.checkreport import CheckReport
from vault.checkstore import DiskListing, Listing, MemoryListing
from vault.errors import (
    IntegrityError,
    NotFoundError,
    PermanentStoreError,
)
from vault.index import BlockIndex, Index, Location, open_index
from vault.indexdb import DiskIndex
from vault.indexopen import estimate_blocks
from vault.keyslots import KeyMaterial
from vault.locks import locked
from vault.mapranges import RANGE_BLOCKS
from vault.pack import MAX_SEALED, PackEntry
from vault.rebuild import for_each, pack_id_if_valid, read_trailer
from vault.repo import Vault
from vault.store.protocol import BlobStore

CHUNK = 8 << 20  # bytes of a pack read at once
PER_BLOCK = 560  # bytes a block costs the in-memory check (measured: 2.6 GiB at 5 M)
FPS_PER_BLOCK = 150  # and its fingerprint, with --read-data
Progress = Callable[[int, int], None]


async def check_vault(store: BlobStore, km: KeyMaterial, *, read_data: bool = False,
                      subset: float | None = None, executor: Executor | None = None,
                      progress: Progress | None = None, wait: float = 0.0,
                      memory: int | None = None,
                      temp_dir: str | os.PathLike[str] | None = None,
                      range_blocks: int = RANGE_BLOCKS) -> CheckReport:
    """Check the vault in ``store``. ``subset`` (percent, with ``read_data``) reads only
    that share of the packs, picked deterministically from their ids.

    ``memory``: a budget in bytes; when what the check holds per block does not fit it,
    the index, the entries listed per pack and the fingerprints go to SQLite files in a
    temporary directory (in ``temp_dir``) instead (vault/checkstore.py), and every block
    lookup is batched, its ids sorted. None: in memory, whatever the size. Each disk of
    a point is checked ``range_blocks`` blocks at a time (vault/checkpoints.py).

    Holds a shared vault lock (vault/locks.py) while it reads, waiting up to ``wait``
    seconds for an exclusive holder (prune, rebuild-index): what they delete is rightly
    gone, and a check that raced them would report it missing. Writers share the vault
    with a check; what they add cannot make it report a problem, because the points are
    listed before the index and the index before the packs (the reverse of the order
    they are written in). Raises ``LockedError`` if the lock cannot be had in time. A
    store that refuses the lock object (read-only credentials or file system) is
    checked without one, with an "unlocked" warning."""
    report = CheckReport(read_data=read_data, subset=subset if read_data else None)
    vault = await open_for_check(store, km, report)
    if vault is None:
        return report
    async with contextlib.AsyncExitStack() as held:
        try:
            await held.enter_async_context(locked(vault, "shared", "check", wait=wait))
        except (PermanentStoreError, OSError) as e:
            report.add(names.LOCKS, "unlocked",
                       f"cannot write a lock object ({e}): checked without the shared "
                       "lock, so a prune or rebuild-index running now could make objects it "
                       "rightly deleted show as missing; run the check again if some are")
        per_block = PER_BLOCK + (FPS_PER_BLOCK if read_data else 0)
        index: BlockIndex
        listing: Listing
        if memory is not None and await estimate_blocks(vault) * per_block > memory:
            tmp = held.enter_context(tempfile.TemporaryDirectory(
                prefix="siterecovery-check-", dir=temp_dir))
            index = await asyncio.to_thread(DiskIndex.open, tmp, vault.config.vault_id
                                            or "unknown", cache_bytes=max(1 << 20, memory // 4))
            listing = DiskListing(Path(tmp) / "check.sqlite", memory // 4)
        else:
            index, listing = Index(), MemoryListing()
        held.callback(index.close)
        held.callback(listing.close)
        c = _Checker(vault, report, executor, index, listing)
        point_objects = [info.name async for info in vault.store.list(names.POINTS)]
        await c.load_index()
        await c.check_packs()
        if read_data:
            await c.read_packs(subset, progress)
        await PointChecks(vault, report, index, listing, c.sizes, c.bad_packs,
                          c.bad_blocks, range_blocks=range_blocks).check_points(point_objects)
    return report


class _Checker:
    def __init__(self, vault: Vault, report: CheckReport, executor: Executor | None,
                 index: BlockIndex, listing: Listing) -> None:
        self.vault, self.report, self.executor = vault, report, executor
        self.index = index
        # pack id -> the entries the index gives; block id -> fingerprint, blocks that verified
        self.listing = listing
        self.listed_by: dict[str, str] = {}  # pack id -> an index object listing it
        self.sizes: dict[str, int] = {}  # pack id -> size, for packs in the store
        self.bad_packs: dict[str, str] = {}  # pack id -> "missing" or "truncated"
        self.bad_blocks: dict[bytes, str] = {}  # block id -> pack whose indexed copy failed
        # pack id -> (trailer entries, end of the blocks), or why the trailer failed; within
        # a budget only the end (the entries, a block's worth each, are read again)
        self.trailers: dict[str, tuple[list[PackEntry], int] | int | IntegrityError] = {}
        self.keep_trailers = isinstance(listing, MemoryListing)

    def add(self, obj: str, kind: str, reason: str) -> None:
        self.report.add(obj, kind, reason)

    # -- index and packs -----------------------------------------------------------
    async def load_index(self) -> None:
        async for info in self.vault.store.list(names.INDEX):
            self.report.counts["index_objects"] += 1
            try:
                listed = open_index(self.vault.keyring, info.name[len(names.INDEX):],
                                    await self.vault.store.get(info.name))
            except NotFoundError:
                continue  # deleted since the listing (a prune or rebuild-index ran)
            except IntegrityError as e:
                self.add(info.name, "damaged", e.reason)
                continue
            for pack_id in listed:
                self.listed_by[pack_id] = info.name
            await asyncio.to_thread(self._add_object, info.name, listed)
        await asyncio.to_thread(self._settle)
        self.report.counts["blocks"] = len(self.index)

    def _add_object(self, name: str, listed: dict[str, list[PackEntry]]) -> None:
        for pack_id, entries in listed.items():
            self.listing.add(pack_id, entries)
        self.index.add_object(name, listed)

    def _settle(self) -> None:
        self.index.settle()
        self.listing.finish()

    async def check_packs(self) -> None:
        unindexed: list[str] = []
        async for info in self.vault.store.list(names.PACKS):
            pack_id = pack_id_if_valid(info.name)
            if pack_id is None:
                self.add(info.name, "stray", "not a pack name (packs/<2 hex>/<64 hex>)")
                continue
            self.sizes[pack_id] = info.size
            if pack_id not in self.listing:
                unindexed.append(pack_id)
        for pack_id in await self._indexed_since(unindexed):
            self.add(names.pack_name(pack_id), "unindexed",
                     "no index object lists this pack ('siterecovery rebuild-index' "
                     "indexes it, 'siterecovery prune' deletes it if unused)")
        self.report.counts["packs"] = len(self.sizes)
        for pack_id in self.listing.packs():
            name = names.pack_name(pack_id)
            size = self.sizes.get(pack_id)
            count, need = self.listing.summary(pack_id)
            if size is None:
                self.bad_packs[pack_id] = "missing"
                self.add(name, "missing", f"{self.listed_by[pack_id]} lists it "
                                          f"({count} blocks), but it is not in the store")
                continue
            if need > size:
                self.bad_packs[pack_id] = "truncated"
                self.add(name, "truncated", f"{size} bytes, but {self.listed_by[pack_id]} "
                                            f"has blocks up to byte {need}")
        await self._check_trailers()

    async def _indexed_since(self, pack_ids: list[str]) -> list[str]:
        """Those of ``pack_ids`` that no index object lists, counting the index objects
        written since the index was loaded: a writer that shares the vault writes a pack,
        then its index object, and its pack is not left behind."""
        if not pack_ids:
            return []
        listed: set[str] = set()
        async for info in self.vault.store.list(names.INDEX):
            if info.name in self.index.objects:
                continue
            try:
                listed.update(open_index(self.vault.keyring, info.name[len(names.INDEX):],
                                         await self.vault.store.get(info.name)))
            except (NotFoundError, IntegrityError):
                continue  # gone again, or damaged: that is for the next check to judge
        return [p for p in pack_ids if p not in listed]

    async def _check_trailers(self) -> None:
        """Read the trailer of every indexed pack that is long enough (the tail and the
        trailer: one or two small ranged reads, no block data). The trailer is sealed
        under a key derived from the pack's name, with the name in its associated data,
        so it authenticates only under its own name: this catches two packs swapped, or
        one copied over another, without reading the data. Its entries must then include
        every entry the index gives for the pack."""
        todo = [p for p in self.listing.packs() if p in self.sizes and p not in self.bad_packs]

        async def one(pack_id: str) -> None:
            name = names.pack_name(pack_id)
            try:
                entries, end = await read_trailer(self.vault, pack_id, self.sizes[pack_id],
                                                  expect=self.listing.summary(pack_id)[0])
            except NotFoundError:
                return  # deleted since the listing; check_points judges what needs it
            except IntegrityError as err:
                self.trailers[pack_id] = err
                self.add(name, "damaged",
                         f"{err.reason} (the pack is damaged, or holds another pack's "
                         "content: a trailer authenticates only under its own pack's name; "
                         "'check --read-data' tells which points it breaks)")
                return
            self.trailers[pack_id] = (entries, end) if self.keep_trailers else end
            self._compare_trailer(pack_id, entries)

        await for_each(todo, one, concurrency=8)
        self.report.counts["trailers_read"] = len(self.trailers)

    def _compare_trailer(self, pack_id: str, trailer: list[PackEntry]) -> None:
        stray = sorted(self.listing.entries(pack_id) - set(trailer), key=lambda e: e.offset)
        if stray:
            self.add(names.pack_name(pack_id), "mismatch",
                     f"{len(stray)} block(s) the index gives are not in the pack's "
                     f"trailer (first: block {stray[0].block_id.hex()[:16]} at "
                     f"{stray[0].offset}+{stray[0].length}, from {self.listed_by[pack_id]})")

    async def read_packs(self, subset: float | None, progress: Progress | None) -> None:
        chosen = sorted(self.sizes) if subset is None else sorted(
            subset_of(list(self.sizes), subset))
        total = sum(self.sizes[p] for p in chosen)
        done = 0

        async def one(pack_id: str) -> None:
            nonlocal done
            await self._read_pack(pack_id)
            done += self.sizes[pack_id]
            if progress is not None:
                progress(done, total)

        await for_each(chosen, one, concurrency=4)
        self.report.counts["packs_read"] = len(chosen)
        self.report.counts["bytes_read"] = total
        if progress is not None and not chosen:
            progress(0, 0)

    async def _read_pack(self, pack_id: str) -> None:
        name = names.pack_name(pack_id)
        size = self.sizes[pack_id]
        indexed = self.listing.entries(pack_id)
        trailer: list[PackEntry] = []
        end = size
        known = self.trailers.get(pack_id)  # read (and reported) by the structural pass
        if isinstance(known, tuple):
            trailer, end = known
        elif isinstance(known, int):  # read, compared and reported; its entries let go
            try:
                trailer, end = await read_trailer(self.vault, pack_id, size)
            except NotFoundError:
                return
            except IntegrityError as err:  # changed since the structural pass read it
                self.add(name, "damaged", err.reason)
        elif known is None:
            try:
                trailer, end = await read_trailer(self.vault, pack_id, size)
            except NotFoundError:
                return
            except IntegrityError as err:
                self.add(name, "damaged", err.reason)
            else:
                self._compare_trailer(pack_id, trailer)
        work: list[PackEntry] = []
        for e in sorted(set(trailer) | indexed, key=lambda e: (e.offset, e.length)):
            if e.offset + e.length > end or e.length > MAX_SEALED:
                self._block_failed(pack_id, e)  # truncation was reported by check_packs
            else:
                work.append(e)
        failures: list[tuple[PackEntry, str]] = []
        verified: list[tuple[bytes, bytes]] = []
        for lo, hi, group in chunks(work, CHUNK):
            try:
                raw = await self.vault.store.get(name, lo, hi - lo)
            except NotFoundError:
                return
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, open_blocks, self.vault.keyring, pack_id, group, raw, lo)
            for e, fp_or_error in zip(group, results, strict=True):
                if isinstance(fp_or_error, bytes):
                    verified.append((e.block_id, fp_or_error))
                else:
                    failures.append((e, fp_or_error))
                    self._block_failed(pack_id, e)
        self.listing.put_fps(verified)
        self.report.counts["blocks_read"] += len(work)
        if failures:
            e, why = failures[0]
            self.add(name, "damaged", f"{len(failures)} of {len(work)} block(s) failed "
                                      f"verification (first: block {e.block_id.hex()[:16]} "
                                      f"at {e.offset}: {why})")

    def _block_failed(self, pack_id: str, e: PackEntry) -> None:
        if self.index.get(e.block_id) == Location(pack_id, e.offset, e.length):
            self.bad_blocks[e.block_id] = names.pack_name(pack_id)
