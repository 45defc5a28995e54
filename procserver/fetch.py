"""The blocks of a recovery point, for an agent writing it back onto its disks: what the
process server answers to a FETCH (feature ``restore``, wire/protocol.py).

An agent failing back (or repairing a disk in place) first asks for the point's
fingerprints (BASIS with ``point``, basis.py), compares them with its disks, and then
fetches only the blocks that differ, in batches of at most ``MAX_FETCH``. Each block is
read from the vault, authenticated and checked against its id (``open_block``), and
sent as a BLOCK frame (a block the point holds as zeros as a ZERO frame), in the order
asked; a FETCH frame with the count ends the answer. The blocks are found in the
point's delta chain of maps (``vault/mapchain.py``: their plaintexts, 40 bytes an entry,
searched newest first), never in a dict of the whole disk; the session keeps the chain
of the last point and disk asked for its next FETCH. The agent never holds the vault
key: the blocks reach it in plaintext over its mutual-TLS session, as its own blocks
left it. The point must be the machine's own; a damaged point is refused with
``ERROR code=bad_fetch`` and nothing of it is sent.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any

import structlog

from procserver.basis import NoBasisError, named_point
from vault import names
from vault.errors import VaultError
from vault.index import Location, locate_blocks
from vault.locks import locked
from vault.mapchain import MapChain, chain_entries
from vault.pack import Frames, open_block
from vault.packrange import read_range
from wire.protocol import (
    MAX_FETCH,
    FrameType,
    ProtocolError,
    block_frame_parts,
    encode_json,
    error_frame,
)

if TYPE_CHECKING:
    from procserver.session import Session

log = structlog.get_logger("procserver.fetch")
LOCK_WAIT = 600.0
# Per session, the last (point, disk) asked: its block count and its map chain (the
# chain's maps as their plaintexts, 40 bytes an entry: no dict of the disk is built)
_CHAINS: weakref.WeakKeyDictionary[Session, tuple[tuple[str, str], int, MapChain]] = \
    weakref.WeakKeyDictionary()


def _request(doc: dict[str, Any]) -> tuple[str, str, list[int]]:
    point, disk, blocks = doc.get("point"), doc.get("disk"), doc.get("blocks")
    if not isinstance(point, str) or not isinstance(disk, str) or not isinstance(blocks, list):
        raise ProtocolError("bad_fetch", "FETCH needs point, disk and blocks")
    if not 0 < len(blocks) <= MAX_FETCH or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in blocks):
        raise ProtocolError("bad_fetch", f"FETCH blocks must be 1-{MAX_FETCH} block numbers")
    return point, disk, blocks


async def serve_fetch(session: Session, doc: dict[str, Any]) -> None:
    """Answer one FETCH: the blocks asked for, then the closing FETCH."""
    point_id, disk, blocks = _request(doc)
    deps, vaults = session.deps, session.deps.vaults
    await deps.trust.authorize_disks(session.machine, [disk])
    if not vaults.ready.is_set():
        await session.send(error_frame("no_point", "the process server cannot reach its "
                                       "vault yet", "try again later"))
        return
    try:
        async with locked(vaults.vault, "shared", f"restore {session.machine}",
                          wait=LOCK_WAIT):
            count, chain = await _chain(session, point_id, disk)
            if max(blocks) >= count:
                raise ProtocolError("bad_fetch", f"block {max(blocks)} is past the "
                                                 f"{count} blocks of disk {disk!r}")
            index = await vaults.refresh_index()
            wanted = await chain.lookup(blocks)
            by_pack = locate_blocks(index, names.POINTS + point_id, disk, wanted)
            where = {n: (pack_id, loc) for pack_id, items in by_pack.items()
                     for n, _bid, loc in items}
            last = _LastRead()
            for n in blocks:
                if n not in where:
                    await session.send(b"".join(block_frame_parts(FrameType.ZERO, 0, n)))
                    continue
                pack_id, loc = where[n]
                data = await _read(session, pack_id, wanted[n], loc, last)
                head, body = block_frame_parts(FrameType.BLOCK, 0, n, data)
                await session.send(head + body)
    except NoBasisError as e:
        await session.send(error_frame("no_point", str(e), "name a point of this machine"))
        return
    except VaultError as e:
        session.log.error("restore_fetch_failed", point=point_id, disk=disk, error=str(e),
                          error_type=type(e).__name__)
        await session.send(error_frame("bad_fetch", f"point {point_id[:16]} could not be "
                                       f"read: {e}", "verify the vault; choose another point"))
        return
    await session.send(encode_json(FrameType.FETCH, {"point": point_id, "disk": disk,
                                                     "blocks": len(blocks)}))


async def _chain(session: Session, point_id: str, disk: str) -> tuple[int, MapChain]:
    cached = _CHAINS.get(session)
    if cached is not None and cached[0] == (point_id, disk):
        return cached[1], cached[2]
    _CHAINS.pop(session, None)  # the last one's maps are not held while these are read
    point = await named_point(session, point_id)
    try:
        entry = point.disk(disk)
    except (KeyError, ValueError, VaultError):
        raise NoBasisError(f"point {point_id[:16]} has no disk {disk!r}") from None
    entries = await chain_entries(session.deps.vaults.vault, point, disk)
    chain = await asyncio.get_running_loop().run_in_executor(
        session.deps.executor, MapChain, entries)
    count = -(-entry.size // entry.block_size)
    _CHAINS[session] = ((point_id, disk), count, chain)
    return count, chain


class _LastRead:
    """The last place of a pack a FETCH read and the frames opened from it: the next
    block asked often lies in the same frame (vault/pack.py)."""

    def __init__(self) -> None:
        self.at: tuple[str, int, int] | None = None
        self.sealed = b""
        self.frames: Frames = {}


async def _read(session: Session, pack_id: str, bid: bytes, loc: Location,
                last: _LastRead) -> bytes:
    vault = session.deps.vaults.vault
    if last.at != (pack_id, loc.offset, loc.length):
        last.sealed = await read_range(vault.store, pack_id, loc.offset, loc.length)
        last.at, last.frames = (pack_id, loc.offset, loc.length), {}
    return await asyncio.get_running_loop().run_in_executor(
        session.deps.executor, open_block, vault.keyring, pack_id, bid, last.sealed,
        last.frames, loc.offset)
