"""One read of a pack's bytes that several blocks need: the span from the first of
their offsets to the end of the last, with a missing or short pack named as damage."""

from __future__ import annotations

from collections.abc import Iterable

from vault import names
from vault.errors import IntegrityError, NotFoundError, PermanentStoreError
from vault.index import Location
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
