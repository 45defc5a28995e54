"""One read of a pack's bytes that several blocks need: the span from the first of
their offsets to the end of the last, with a missing or short pack named as damage;
and the blocks opened from it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vault import names
from vault.crypto import Keyring
from vault.errors import IntegrityError, NotFoundError, PermanentStoreError
from vault.index import Location
from vault.pack import Frames, open_block
from vault.store.protocol import BlobStore


async def read_range(store: BlobStore, pack_id: str, offset: int, length: int) -> bytes:
    """``length`` bytes of pack ``pack_id`` from ``offset``; ``IntegrityError`` naming
    the pack if it is missing or shorter than its index says."""
    pname = names.pack_name(pack_id)
    try:
        return await store.get(pname, offset, length)
    except NotFoundError:
        raise IntegrityError(pname, "the pack is missing") from None
    except PermanentStoreError:
        raise IntegrityError(pname, "the pack is shorter than its index says "
                                    "(truncated)") from None


async def read_span(store: BlobStore, pack_id: str,
                    items: Iterable[tuple[int, bytes, Location]]) -> tuple[bytes, int]:
    """The bytes of ``pack_id`` that hold every block of ``items`` (block number, id,
    location), and the offset they start at."""
    locs = [loc for _, _, loc in items]
    lo = min(loc.offset for loc in locs)
    hi = max(loc.offset + loc.length for loc in locs)
    return await read_range(store, pack_id, lo, hi - lo), lo


def open_span(keyring: Keyring, pack_id: str, items: Iterable[tuple[int, bytes, Location]],
              raw: bytes, base: int) -> Iterator[tuple[int, bytes]]:
    """Each block of ``items`` opened from ``raw`` (the bytes of ``pack_id`` from
    ``base``, as ``read_span`` read them): ``(block number, data)`` in offset order, so
    the blocks of one frame are opened together and one frame at a time is held
    (``open_block``). CPU-bound: run on a worker thread."""
    view = memoryview(raw)
    frames: Frames = {}
    for n, bid, loc in sorted(items, key=lambda i: i[2].offset):
        start = loc.offset - base
        yield n, open_block(keyring, pack_id, bid, view[start:start + loc.length], frames,
                            loc.offset)
