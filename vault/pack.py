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

A vault of format 3 seals several blocks together in a **frame** (ObjectType.FRAME,
nonce = counter of the frame in the pack, compressed as one zstd frame: zstd finds the
matches across the blocks a single block is too small for). Frame plaintext::

    u32 count | count * (id[32] | u32 length) | the blocks' bytes, in that order

Every block of a frame has the frame's ``offset`` and ``length`` in the trailer and
the index: a reader reads the frame, opens it (``open_block`` tells a frame from a
single block by its type byte, which is authenticated) and takes the block its id
names, whose keyed hash it then checks, as for a single block. A caller that opens
several blocks from one read of a pack goes through them in offset order and passes a
``frames`` dict that holds the frame opened last (``vault/packrange.py: open_span``):
the blocks of one frame then cost one decryption and one decompression, one frame is
held at a time, and nothing opened is kept past the read it came from.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zstandard

from vault.crypto import (
    OVERHEAD,
    Keyring,
    ObjectType,
    compress_payload,
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
FRAME_BYTES = 1 << 20  # a frame's blocks: at most this much plaintext, or one block
ZSTD_LEVEL = 2  # the zstd level packs are written at unless a vault object is told
ZSTD_LEVELS = range(1, 20)  # the levels a writer may be told
# From level 2 on, the match finder's table has at least 2^this entries (level 1 stays
# zstd's fastest): level 2's own 2^16 stores ~0.8 % more of the benchmark image for ~10 %
# less compression time than 2^17 (level 3's); README "The vault's size against
# restic's". Readers do not care.
ZSTD_MIN_HASH_LOG = 17
FRAME_ENTRY = struct.Struct("<32sI")
MAX_FRAME = 8 << 20  # a reader's cap on a frame's plaintext
MAX_SEALED = MAX_FRAME + OVERHEAD  # the longest a block's (or frame's) bytes in a pack
#: a frame opened: its plaintext, and each block's ``(start, length)`` in it by id
Frame = tuple[bytes, dict[bytes, tuple[int, int]]]
#: the frame last opened from one read of a pack, by its offset in the pack
Frames = dict[int, Frame]


@dataclass(frozen=True, slots=True)
class PackEntry:
    block_id: bytes
    offset: int
    length: int


def pack_compressor(level: int = ZSTD_LEVEL) -> zstandard.ZstdCompressor:
    """A compressor of packs at ``level``: zstd's parameters for that level, from level 2 on
    with a match table of at least 2^``ZSTD_MIN_HASH_LOG`` entries. Not to be shared
    between threads."""
    params = zstandard.ZstdCompressionParameters.from_level(level)
    if level >= 2 and params.hash_log < ZSTD_MIN_HASH_LOG:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, hash_log=ZSTD_MIN_HASH_LOG)
    return zstandard.ZstdCompressor(compression_params=params)


def build_pack(
    keyring: Keyring,
    pack_id: str,
    blocks: list[tuple[bytes, bytes | memoryview]],
    compressor: zstandard.ZstdCompressor,
    frame_bytes: int = 0,
) -> tuple[bytearray, list[PackEntry]]:
    """Seal ``(block_id, data)`` pairs into one pack: each block alone (``frame_bytes``
    0, formats 1 and 2), or in frames of up to ``frame_bytes`` of plaintext (format 3);
    CPU-bound, run on a worker thread; ``compressor`` is that thread's own.

    The payloads are compressed first, so every sealed unit's place is known before any
    is encrypted: each is encrypted straight into its place in the pack's one buffer
    (no buffer per unit, no join)."""
    if frame_bytes:
        otype = ObjectType.FRAME
        groups = _frames(blocks, frame_bytes)
        # One frame at a time through the caller's context: each output is at most a
        # frame, and nothing is set up per call (multi_compress_to_buffer, kept for
        # single blocks, makes a fresh context and one output buffer per call: page
        # faults on every pack; README "Sealing without page faults").
        payloads = [compress_payload(frame_plaintext(g), compressor) for g in groups]
    else:
        otype = ObjectType.BLOCK
        groups = [[item] for item in blocks]
        payloads = compress_payloads([data for _, data in blocks], compressor)
    entries: list[PackEntry] = []
    off = 0
    for group, (payload, _flags) in zip(groups, payloads, strict=True):
        length = OVERHEAD + len(payload)  # every block of a unit is found at the unit
        entries.extend(PackEntry(bid, off, length) for bid, _data in group)
        off += length
    trailer_plain = struct.pack("<I", len(entries)) + b"".join(
        ENTRY.pack(e.block_id, e.offset, e.length) for e in entries
    )
    trailer = seal(
        keyring.aead(ObjectType.PACK_TRAILER, pack_id), ObjectType.PACK_TRAILER, pack_id,
        trailer_plain, compressor=compressor,
    )
    out = bytearray(off + len(trailer) + TAIL.size)
    view = memoryview(out)
    aead = keyring.aead(otype, pack_id)
    pos = 0
    for i, (payload, flags) in enumerate(payloads):
        end = pos + OVERHEAD + len(payload)
        # A single block's id is part of its associated data; a frame's are inside it.
        seal_into(aead, otype, pack_id, payload, flags, view[pos:end],
                  nonce=counter_nonce(i), extra=b"" if frame_bytes else blocks[i][0])
        pos = end
    view[off:off + len(trailer)] = trailer
    TAIL.pack_into(out, off + len(trailer), len(trailer), MAGIC)
    view.release()
    return out, entries


def _frames(blocks: list[tuple[bytes, bytes | memoryview]], frame_bytes: int
            ) -> list[list[tuple[bytes, bytes | memoryview]]]:
    """``blocks`` in order, cut into frames of at most ``frame_bytes`` (or one block)."""
    groups: list[list[tuple[bytes, bytes | memoryview]]] = []
    size = 0
    for item in blocks:
        if not groups or size + len(item[1]) > frame_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += len(item[1])
    return groups


def frame_plaintext(group: list[tuple[bytes, bytes | memoryview]]) -> bytes:
    """A frame's plaintext: its table of ids and lengths, then the blocks."""
    head = struct.pack("<I", len(group)) + b"".join(
        FRAME_ENTRY.pack(bid, len(data)) for bid, data in group)
    return b"".join([head, *(data for _bid, data in group)])


def open_block(
    keyring: Keyring, pack_id: str, block_id: bytes, sealed: bytes | memoryview,
    frames: Frames | None = None, at: int = 0,
) -> bytes:
    """Decrypt one block (or the frame that holds it, and take the block from it) and
    check that its content hashes to ``block_id``. ``frames`` and ``at``: the frame last
    opened from the read ``sealed`` comes from, and ``sealed``'s offset in the pack (a
    frame opened replaces it; one found there is not opened again). It holds one frame
    (1 MiB of blocks as written by default, at most ``MAX_FRAME``), so a caller goes
    through the blocks of a read in offset order: a frame's blocks are opened together."""
    what = f"packs/{pack_id[:2]}/{pack_id} block {block_id.hex()[:16]}"
    if len(sealed) > 1 and sealed[1] == ObjectType.FRAME:
        frame = None if frames is None else frames.get(at)
        if frame is None:
            plain = unseal(keyring.aead(ObjectType.FRAME, pack_id), ObjectType.FRAME,
                           pack_id, sealed, max_size=MAX_FRAME, what=what)
            frame = (plain, parse_frame(plain, what))
            if frames is not None:
                frames.clear()
                frames[at] = frame
        place = frame[1].get(block_id)
        if place is None:
            raise IntegrityError(what, "the frame at the block's place does not hold it")
        data = frame[0][place[0]:place[0] + place[1]]
    else:
        data = unseal(
            keyring.aead(ObjectType.BLOCK, pack_id), ObjectType.BLOCK, pack_id, sealed,
            extra=block_id, max_size=MAX_BLOCK, what=what,
        )
    if keyring.block_id(data) != block_id:
        raise IntegrityError(what, "content does not match its block id")
    return data


def parse_frame(plain: bytes, what: str) -> dict[bytes, tuple[int, int]]:
    """Where each block of a frame's plaintext is, by id: ``(start, length)``;
    ``IntegrityError`` if its table does not add up to its length."""
    if len(plain) < 4:
        raise IntegrityError(what, "the frame is truncated")
    (count,) = struct.unpack_from("<I", plain, 0)
    pos = 4 + count * FRAME_ENTRY.size
    if count == 0 or pos > len(plain):
        raise IntegrityError(what, "the frame's table does not match its length")
    blocks: dict[bytes, tuple[int, int]] = {}
    for i in range(count):
        bid, length = FRAME_ENTRY.unpack_from(plain, 4 + i * FRAME_ENTRY.size)
        if length > MAX_BLOCK or pos + length > len(plain):
            raise IntegrityError(what, "the frame's table does not match its length")
        blocks[bid] = (pos, length)
        pos += length
    if pos != len(plain):
        raise IntegrityError(what, "the frame's table does not match its length")
    return blocks


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
