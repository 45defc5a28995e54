"""What ``check --read-data`` computes off the event loop and without the store: which
packs a subset reads, how a pack is cut into bounded reads, each block's
fingerprint."""

from __future__ import annotations

import hashlib
import math

from common.digest import fingerprint
from vault.crypto import Keyring
from vault.errors import IntegrityError
from vault.pack import Frames, PackEntry, open_block


def subset_of(pack_ids: list[str], percent: float) -> set[str]:
    """A deterministic ``percent`` share of ``pack_ids`` (at least one if any): the packs
    whose SHA-256 of the id sorts lowest. Spread at random over the vault, and the same
    from run to run."""
    want = min(len(pack_ids), math.ceil(len(pack_ids) * percent / 100))
    return set(sorted(pack_ids, key=lambda p: hashlib.sha256(p.encode()).digest())[:want])


def chunks(entries: list[PackEntry], limit: int) -> list[tuple[int, int, list[PackEntry]]]:
    """Group entries (sorted by offset) into reads ``(lo, hi, entries)`` of at most
    ``limit`` bytes (or one entry, if it is larger)."""
    out: list[tuple[int, int, list[PackEntry]]] = []
    for e in entries:
        if out and e.offset + e.length - out[-1][0] <= limit and e.offset >= out[-1][0]:
            lo, hi, group = out[-1]
            group.append(e)
            out[-1] = (lo, max(hi, e.offset + e.length), group)
        else:
            out.append((e.offset, e.offset + e.length, [e]))
    return out


def open_blocks(keyring: Keyring, pack_id: str, group: list[PackEntry], raw: bytes,
                base: int) -> list[bytes | str]:
    """Per entry: the block's fingerprint, or why it failed (runs on a worker thread)."""
    view = memoryview(raw)
    frames: Frames = {}
    out: list[bytes | str] = []
    for e in group:
        try:
            data = open_block(keyring, pack_id, e.block_id,
                              view[e.offset - base: e.offset - base + e.length],
                              frames, e.offset)
        except IntegrityError as err:
            out.append(err.reason)
        else:
            out.append(fingerprint(data))
    return out
