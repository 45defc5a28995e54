"""Packs: sealed blocks appended into one object, with a sealed trailer.

Pack layout::

    offset   size  field
    0        ...   sealed block 0 (see crypto.py), nonce = counter 0
    ...      ...   sealed block i, nonce = counter i
    T        t     sealed trailer (ObjectType.PACK_TRAILER, random nonce)
    T+t      4     u32 LE t
    T+t+4    4     magic b"SRPK"

Trailer plaintext: ``u32 count`` then ``count`` entries of
``id[32] | u64 offset | u32 length``. The trailer lets the index be rebuilt from
packs alone. Each pack has its own key (HKDF of the master key and the pack's
random name), so counter nonces never repeat under a key.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zstandard

from vault.crypto import (
    OVERHEAD,
    Keyring,
    ObjectType,
    compress_payloads,
    counter_nonce,
    seal,
    seal_into,
    unseal,
)
from vault.errors import IntegrityError

MAGIC = b"SRPK"
TAIL = struct.Struct("<I4s")
ENTRY = struct.Struct("<32sQI")
MAX_BLOCK = 1 << 20
MAX_TRAILER = 64 << 20


@dataclass(frozen=True, slots=True)
class PackEntry:
    block_id: bytes
    offset: int
    length: int


def build_pack(
    keyring: Keyring,
    pack_id: str,
    blocks: list[tuple[bytes, bytes | memoryview]],
    compressor: zstandard.ZstdCompressor,
) -> tuple[bytes, list[PackEntry]]:
    """Seal ``(block_id, data)`` pairs into one pack; CPU-bound, run on a worker thread."""
    aead = keyring.aead(ObjectType.BLOCK, pack_id)
    parts: list[bytes | bytearray] = []
    entries: list[PackEntry] = []
    off = 0
    payloads = compress_payloads([data for _, data in blocks], compressor)
    for i, ((bid, _data), (payload, flags)) in enumerate(zip(blocks, payloads, strict=True)):
        # Sealed straight into its own buffer: the join below is the only copy.
        sealed = bytearray(OVERHEAD + len(payload))
        seal_into(aead, ObjectType.BLOCK, pack_id, payload, flags, sealed,
                  nonce=counter_nonce(i), extra=bid)
        parts.append(sealed)
        entries.append(PackEntry(bid, off, len(sealed)))
        off += len(sealed)
    trailer_plain = struct.pack("<I", len(entries)) + b"".join(
        ENTRY.pack(e.block_id, e.offset, e.length) for e in entries
    )
    trailer = seal(
        keyring.aead(ObjectType.PACK_TRAILER, pack_id), ObjectType.PACK_TRAILER, pack_id,
        trailer_plain, compressor=compressor,
    )
    parts.append(trailer)
    parts.append(TAIL.pack(len(trailer), MAGIC))
    return b"".join(parts), entries


def open_block(
    keyring: Keyring, pack_id: str, block_id: bytes, sealed: bytes | memoryview
) -> bytes:
    """Decrypt one block and check that its content hashes to ``block_id``."""
    what = f"packs/{pack_id[:2]}/{pack_id} block {block_id.hex()[:16]}"
    data = unseal(
        keyring.aead(ObjectType.BLOCK, pack_id), ObjectType.BLOCK, pack_id, sealed,
        extra=block_id, max_size=MAX_BLOCK, what=what,
    )
    if keyring.block_id(data) != block_id:
        raise IntegrityError(what, "content does not match its block id")
    return data


def parse_trailer(keyring: Keyring, pack_id: str, sealed: bytes) -> list[PackEntry]:
    what = f"packs/{pack_id[:2]}/{pack_id} trailer"
    plain = unseal(
        keyring.aead(ObjectType.PACK_TRAILER, pack_id), ObjectType.PACK_TRAILER, pack_id,
        sealed, max_size=MAX_TRAILER, what=what,
    )
    if len(plain) < 4:
        raise IntegrityError(what, "trailer is truncated")
    (count,) = struct.unpack_from("<I", plain, 0)
    if len(plain) != 4 + count * ENTRY.size:
        raise IntegrityError(what, "trailer length does not match its entry count")
    return [PackEntry(*ENTRY.unpack_from(plain, 4 + i * ENTRY.size)) for i in range(count)]
