"""A point's fingerprint map, recomputed from the vault: what a resync compares against.

When an agent lost its own map (or the process server its cache), the agent need not
resend the whole disk: the process server reads the machine's latest point back from
the vault, block by block, and hands the agent the fingerprint of every block
(``xxh3_128``, as the agent computes them). The agent sends only the blocks whose
fingerprint differs, as a delta on that point.

The result is checked against the digest the point recorded when it was written, so
a map built from damaged or substituted data is refused rather than trusted.

This is the whole map at once (16 bytes a block, and the resolved map as a dict): the
process server sends a basis per range instead (vault/fpstream.py, the same bytes,
compared in tests/test_resync_stream.py).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from common.digest import block_count, digest_of_fingerprint_map, zero_fingerprint
from vault import names
from vault.errors import IntegrityError
from vault.fpstream import span_fingerprints
from vault.index import BlockIndex, Location, locate_blocks
from vault.packrange import read_span
from vault.point import Point
from vault.repo import Vault

FP = 16  # bytes per fingerprint


async def point_fingerprints(vault: Vault, point: Point, disk: str, *, index: BlockIndex,
                             executor: Executor | None = None) -> bytes:
    """The concatenated fingerprints of every block of ``disk`` in ``point``."""
    entry = point.disk(disk)
    bmap = await vault.resolve_map(point, disk)
    size, bs = entry.size, entry.block_size
    nblocks = block_count(size, bs)
    out = bytearray(FP * nblocks)
    # Blocks absent from the map are zeros; the last one may be short.
    for n in range(nblocks):
        if n not in bmap.blocks:
            out[n * FP:(n + 1) * FP] = zero_fingerprint(min(bs, size - n * bs))
    by_pack = locate_blocks(index, names.POINTS + point.id, disk, bmap.blocks)
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(4)

    async def one(pack_id: str, items: list[tuple[int, bytes, Location]]) -> None:
        async with sem:
            raw, lo = await read_span(vault.store, pack_id, items)
            got = await loop.run_in_executor(executor, span_fingerprints, vault, pack_id, items,
                                             raw, lo)
            for n, fp in got:
                out[n * FP:(n + 1) * FP] = fp

    await asyncio.gather(*(one(p, items) for p, items in by_pack.items()))
    if entry.digest and digest_of_fingerprint_map(out) != entry.digest:
        raise IntegrityError(f"points/{point.id}", f"disk {disk!r} read back from the vault "
                             "does not match the digest recorded with the point")
    return bytes(out)
