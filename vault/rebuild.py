"""Rebuild the index from pack trailers alone, and find a pack's trailer.

A pack ends with ``sealed trailer | u32 trailer length | b"SRPK"`` (vault/pack.py).
The 8-byte tail is not authenticated: it only says where the trailer is, and the
trailer authenticates under the pack's own name and key.

``rebuild_index`` reads every pack's trailer, writes new index objects listing
every pack whose trailer authenticates, and only then deletes the index objects
that existed before, so an interruption never leaves the vault without an index
(it leaves duplicates, which are harmless); run it again to finish. A pack whose
trailer fails is reported and skipped; if a readable old index object listed it,
those (authenticated) entries are carried over, so a rebuild never makes reachable
blocks unreachable. The caller holds the vault's exclusive lock (vault/locks.py).
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from vault import names
from vault.crypto import OVERHEAD
from vault.errors import IntegrityError, NotFoundError, VaultError
from vault.index import open_index
from vault.pack import (
    ENTRY,
    MAGIC,
    MAX_SEALED,
    MAX_TRAILER,
    TAIL,
    PackEntry,
    parse_trailer,
)
from vault.repo import Vault
from vault.store.protocol import BlobInfo

INDEX_CHUNK = 200_000  # entries per new index object (about 9 MB of plaintext)
CONCURRENCY = 8
PER_BLOCK = 210  # bytes a block costs the in-memory rebuild (measured: 1 GiB at 5 M)
TRAILER_PROBE = 64 << 10  # bytes read from a pack's end to find its tail and trailer
_PACK_ID = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


def pack_id_if_valid(name: str) -> str | None:
    """The pack id of store object ``name``, or None if it is not ``packs/<2>/<64 hex>``."""
    pack_id = names.pack_id_of(name)
    if _PACK_ID.match(pack_id) and names.pack_name(pack_id) == name:
        return pack_id
    return None


async def for_each(items: Iterable[T], fn: Callable[[T], Awaitable[None]],
                   concurrency: int = CONCURRENCY) -> None:
    """Run ``fn`` on every item, at most ``concurrency`` at a time; the first error
    stops the others and is raised."""
    it = iter(items)

    async def worker() -> None:
        for item in it:  # one shared iterator: each item goes to exactly one worker
            await fn(item)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def read_trailer(vault: Vault, pack_id: str, size: int, *, expect: int | None = None
                       ) -> tuple[list[PackEntry], int]:
    """Locate, authenticate and parse the trailer of a pack of ``size`` bytes.

    ``expect``: how many blocks the pack is expected to hold (the index says), to read
    just enough of its end; without it a fixed probe is read. Returns ``(entries,
    data_end)``: ``data_end`` is where the trailer starts, i.e. the end of the sealed
    blocks. ``IntegrityError`` names the pack when the tail or the trailer is damaged,
    or when the trailer's entries do not tile the blocks region."""
    name = names.pack_name(pack_id)
    if size < TAIL.size + OVERHEAD:
        raise IntegrityError(name, f"{size} bytes is too short for a pack (truncated)")
    # One ranged read of the pack's end usually holds the tail and the whole trailer
    # (44 bytes per block, never more once sealed: it is compressed only if that helps);
    # a second read is needed only for a trailer larger than expected.
    want = TRAILER_PROBE if expect is None else TAIL.size + OVERHEAD + 4 + ENTRY.size * expect
    probe = min(size, want)
    end = await vault.store.get(name, size - probe, probe)
    if len(end) != probe:
        raise IntegrityError(name, f"shorter than the {size} bytes listed (truncated)")
    t, magic = TAIL.unpack(end[-TAIL.size:])
    if magic != MAGIC:
        raise IntegrityError(name, "trailer: the pack does not end with the pack tail "
                                   "(truncated, extended or not a pack)")
    if not OVERHEAD <= t <= min(size - TAIL.size, MAX_TRAILER + OVERHEAD):
        raise IntegrityError(name, f"trailer: the tail gives a trailer length of {t} bytes, "
                                   f"which does not fit a pack of {size} bytes")
    data_end = size - TAIL.size - t
    if t + TAIL.size <= probe:
        sealed = end[probe - TAIL.size - t: probe - TAIL.size]
    else:
        sealed = await vault.store.get(name, data_end, t)
    try:
        entries = parse_trailer(vault.keyring, pack_id, sealed)
    except IntegrityError as e:
        raise IntegrityError(name, f"trailer: {e.reason}") from None
    except struct.error as e:  # an impossibly short (but authentic) trailer
        raise IntegrityError(name, f"trailer: malformed: {e}") from None
    layout = layout_problem(entries, data_end)
    if layout is not None:
        raise IntegrityError(name, f"trailer: {layout}")
    return entries, data_end


def layout_problem(entries: list[PackEntry], data_end: int) -> str | None:
    """Why trailer ``entries`` do not tile ``[0, data_end)`` back to back, or None. The
    blocks of one frame (vault/pack.py) share its place: an entry at the place of the
    one before it is the next block of the same frame."""
    pos, last = 0, (-1, -1)
    for i, e in enumerate(entries):
        if (e.offset, e.length) == last:
            continue
        if e.offset != pos or not OVERHEAD <= e.length <= MAX_SEALED:
            return (f"entry {i} (block {e.block_id.hex()[:16]}) at {e.offset}+{e.length} "
                    f"does not follow the previous block at {pos}")
        pos, last = pos + e.length, (e.offset, e.length)
    if pos != data_end:
        return f"the blocks end at {pos} but the trailer starts at {data_end}"
    return None


async def list_packs(vault: Vault) -> AsyncIterator[tuple[str, BlobInfo]]:
    """Every well-named pack object in the store: ``(pack id, info)``."""
    async for info in vault.store.list(names.PACKS):
        pack_id = pack_id_if_valid(info.name)
        if pack_id is not None:
            yield pack_id, info


@dataclass
class RebuildReport:
    packs_indexed: int = 0
    blocks: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # pack object -> reason
    carried_over: list[str] = field(default_factory=list)  # skipped, old entries kept
    index_written: list[str] = field(default_factory=list)
    index_deleted: list[str] = field(default_factory=list)
    unreadable_index: dict[str, str] = field(default_factory=dict)  # old object -> reason


async def rebuild_index(vault: Vault, *, progress: Callable[[str], None] | None = None,
                        memory: int | None = None) -> RebuildReport:
    """Rebuild the index (see the module). ``memory``: a budget in bytes; when the
    vault's index does not fit it (``PER_BLOCK``), the trailers are read and written
    out a few packs at a time, in pack order, and only the entries of damaged packs are
    held to the end (``_rebuild_streaming``). None: in memory, whatever the size."""
    say = progress or (lambda _m: None)
    report = RebuildReport()
    old = [b.name async for b in vault.store.list(names.INDEX)]  # before writing anything
    packs = [(pid, info) async for pid, info in list_packs(vault)]
    if not packs and old:
        raise VaultError(f"{vault.store.url} holds {len(old)} index object(s) but no packs; "
                         "refusing to replace the index with an empty one (is the vault URL "
                         "right?)")
    if memory is not None and await _estimate(vault) * PER_BLOCK > memory:
        await _rebuild_streaming(vault, old, sorted(packs), report, memory, say)
        await _delete_old(vault, old, report, say)
        return report
    found: dict[str, list[PackEntry]] = {}
    done = 0

    async def one(item: tuple[str, BlobInfo]) -> None:
        nonlocal done
        pack_id, info = item
        try:
            found[pack_id], _ = await read_trailer(vault, pack_id, info.size)
        except NotFoundError:
            pass  # deleted since the listing: nothing to index
        except IntegrityError as e:
            report.skipped[info.name] = e.reason
        done += 1
        if done % 1000 == 0:
            say(f"{done} of {len(packs)} pack trailers read")

    await for_each(packs, one)
    say(f"{len(found)} of {len(packs)} pack trailers read, {len(report.skipped)} damaged")
    if report.skipped:
        await _carry_over(vault, old, found, report)
    ordered = sorted(found.items())
    batch: dict[str, list[PackEntry]] = {}
    count = 0
    for i, (pack_id, entries) in enumerate(ordered):
        batch[pack_id] = entries
        count += len(entries)
        if count >= INDEX_CHUNK or i == len(ordered) - 1:
            report.index_written.append(names.INDEX + await vault.put_index(batch))
            batch, count = {}, 0
    report.packs_indexed = len(found)
    report.blocks = sum(len(e) for e in found.values())
    await _delete_old(vault, old, report, say)
    return report


async def _delete_old(vault: Vault, old: list[str], report: RebuildReport,
                      say: Callable[[str], None]) -> None:
    for name in old:  # only now: the new index is durable
        await vault.store.delete(name)
        report.index_deleted.append(name)
    say(f"wrote {len(report.index_written)} index object(s), deleted {len(old)} old one(s)")


async def _estimate(vault: Vault) -> int:
    return sum([i.size async for i in vault.store.list(names.INDEX)]) // ENTRY.size


async def _rebuild_streaming(vault: Vault, old: list[str], packs: list[tuple[str, BlobInfo]],
                             report: RebuildReport, memory: int,
                             say: Callable[[str], None]) -> None:
    """The trailers of ``CONCURRENCY`` packs at a time, in pack order, appended to an
    index object written once it holds ``chunk`` entries (fewer than ``INDEX_CHUNK``
    when the budget is small); the entries of damaged packs that old index objects
    give are written last."""
    chunk = max(1, min(INDEX_CHUNK, memory // PER_BLOCK))
    batch: dict[str, list[PackEntry]] = {}
    count = 0

    async def flush() -> None:
        nonlocal batch, count
        if batch:
            report.index_written.append(names.INDEX + await vault.put_index(batch))
            batch, count = {}, 0

    got: dict[str, list[PackEntry]] = {}  # the trailers of the packs being read

    async def one(item: tuple[str, BlobInfo]) -> None:
        pack_id, info = item
        try:
            got[pack_id], _ = await read_trailer(vault, pack_id, info.size)
        except NotFoundError:
            pass  # deleted since the listing: nothing to index
        except IntegrityError as e:
            report.skipped[info.name] = e.reason

    for lo in range(0, len(packs), CONCURRENCY):
        window = packs[lo:lo + CONCURRENCY]
        got.clear()
        await for_each(window, one)
        for pack_id, _info in window:
            entries = got.get(pack_id)
            if entries is None:
                continue
            if count >= chunk:
                await flush()
            batch[pack_id] = entries
            count += len(entries)
            report.packs_indexed += 1
            report.blocks += len(entries)
        if (lo // CONCURRENCY) % 125 == 124:
            say(f"{lo + len(window)} of {len(packs)} pack trailers read")
    say(f"{report.packs_indexed} of {len(packs)} pack trailers read, "
        f"{len(report.skipped)} damaged")
    if report.skipped:
        carried: dict[str, list[PackEntry]] = {}
        await _carry_over(vault, old, carried, report)
        for pack_id, entries in sorted(carried.items()):
            if count >= chunk:
                await flush()
            batch[pack_id] = entries
            count += len(entries)
            report.packs_indexed += 1
            report.blocks += len(entries)
    await flush()


async def _carry_over(vault: Vault, old: list[str], found: dict[str, list[PackEntry]],
                      report: RebuildReport) -> None:
    """Keep what readable old index objects say about packs whose trailer failed."""
    skipped = {names.pack_id_of(n) for n in report.skipped}
    for name in old:
        try:
            listed = open_index(vault.keyring, name[len(names.INDEX):],
                                await vault.store.get(name))
        except NotFoundError:
            continue
        except IntegrityError as e:
            report.unreadable_index[name] = e.reason
            continue
        for pack_id, entries in listed.items():
            if pack_id in skipped:
                kept = found.setdefault(pack_id, [])
                kept.extend(e for e in entries if e not in kept)
    report.carried_over = sorted(names.pack_name(p) for p in skipped if p in found)
