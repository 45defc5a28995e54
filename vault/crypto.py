"""Keys and sealing: zstd, then AES-256-GCM with associated data.

Sealed unit (all integers little-endian)::

    offset  size  field
    0       1     format version (1)
    1       1     object type (ObjectType)
    2       1     flags: bit 0 = payload is zstd-compressed
    3       1     reserved, 0
    4       12    nonce
    16      n     ciphertext
    16+n    16    GCM tag

The associated data is ``header[0:4] || u16 len(name) || name || extra``: it binds
the unit to its type, to the object it lives in and, for blocks, to the block id,
so storage cannot hand us a different object, or move a block, undetected.
"""

from __future__ import annotations

import enum
import os
import struct
import threading
from collections.abc import Sequence
from typing import cast

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vault.errors import FormatError, IntegrityError

FORMAT_VERSION = 1
HEADER = struct.Struct("<BBBB12s")
OVERHEAD = HEADER.size + 16
FLAG_ZSTD = 0x01
MASTER_KEY_BYTES = 64


class ObjectType(enum.IntEnum):
    CONFIG = 1
    BLOCK = 2
    PACK_TRAILER = 3
    INDEX = 4
    POINT = 5
    MAP = 6
    LOCK = 7
    LEASE = 8
    MAP_CHUNK = 9
    FRAME = 10


def _hkdf(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


class Keyring:
    """The keys derived from one vault master key.

    - ``id_key``: keys the BLAKE3 hash that names blocks, so names reveal nothing.
    - per-object AES-256-GCM keys: HKDF(master, type || object name). Object names
      are random 256-bit values, so every pack gets its own key and its blocks use
      a counter nonce that cannot repeat under that key.
    """

    def __init__(self, master: bytes) -> None:
        if len(master) != MASTER_KEY_BYTES:
            raise FormatError(f"master key must be {MASTER_KEY_BYTES} bytes")
        self._master = master
        self.id_key = _hkdf(master, b"siterecovery/v1/block-id")
        self._data_root = _hkdf(master, b"siterecovery/v1/data")

    def __repr__(self) -> str:
        return "Keyring(<secret>)"

    def block_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self.id_key).digest()

    @property
    def master_key(self) -> bytes:
        """The master key itself: only for wrapping it into a new key slot."""
        return self._master

    def name_for(self, kind: str, *parts: str) -> str:
        """A deterministic object name that reveals nothing without the key."""
        h = blake3.blake3(key=self.id_key)
        h.update(kind.encode() + b"\0" + b"\0".join(p.encode() for p in parts))
        return h.hexdigest()

    def aead(self, otype: ObjectType, name: str) -> AESGCM:
        info = b"siterecovery/v1/object/" + bytes([otype]) + name.encode()
        return AESGCM(
            HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
                self._data_root
            )
        )


def _ad(header: bytes, name: str, extra: bytes) -> bytes:
    n = name.encode()
    return header[:4] + struct.pack("<H", len(n)) + n + extra


def counter_nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")


def seal(
    aead: AESGCM,
    otype: ObjectType,
    name: str,
    plaintext: bytes | memoryview,
    *,
    nonce: bytes | None = None,
    extra: bytes = b"",
    compressor: zstandard.ZstdCompressor | None = None,
) -> bytes:
    """Compress (if it helps) and encrypt ``plaintext`` as one sealed unit.

    ``compressor`` must not be shared between threads (zstandard objects are not
    thread-safe); pass one per worker thread.
    """
    payload, flags = compress_payload(plaintext, compressor)
    out = bytearray(OVERHEAD + len(payload))
    seal_into(aead, otype, name, payload, flags, out,
              nonce=nonce if nonce is not None else os.urandom(12), extra=extra)
    return bytes(out)


def compress_payload(
    plaintext: bytes | memoryview, compressor: zstandard.ZstdCompressor | None
) -> tuple[bytes | memoryview, int]:
    """The payload and flags of a sealed unit: zstd output only when it is smaller."""
    if compressor is not None and len(plaintext) > 64:
        packed = compressor.compress(plaintext)
        if len(packed) < len(plaintext):
            return packed, FLAG_ZSTD
    return plaintext, 0


def compress_payloads(
    plaintexts: Sequence[bytes | memoryview], compressor: zstandard.ZstdCompressor
) -> list[tuple[bytes | memoryview, int]]:
    """``compress_payload`` of many plaintexts in one call into zstd, which runs without
    the GIL for all of them: a worker thread then does not wait for the GIL once per
    block while the event loop's thread holds it (the same output, faster)."""
    big = [i for i, p in enumerate(plaintexts) if len(p) > 64]
    out: list[tuple[bytes | memoryview, int]] = [(p, 0) for p in plaintexts]
    if not big:
        return out
    try:
        packed = compressor.multi_compress_to_buffer([plaintexts[i] for i in big], threads=1)
    except (AttributeError, NotImplementedError):  # a zstandard backend without it
        for i in big:
            out[i] = compress_payload(plaintexts[i], compressor)
        return out
    for k, i in enumerate(big):
        # A BufferSegment has the buffer protocol (its type stubs do not say so).
        seg = memoryview(cast(bytes, packed[k]))
        if len(seg) < len(plaintexts[i]):
            out[i] = (seg, FLAG_ZSTD)
    return out


def seal_into(
    aead: AESGCM,
    otype: ObjectType,
    name: str,
    payload: bytes | memoryview,
    flags: int,
    out: bytearray | memoryview,
    *,
    nonce: bytes,
    extra: bytes = b"",
) -> None:
    """Encrypt an already compressed ``payload`` (``compress_payload``) as one sealed unit
    into ``out``, which must be exactly ``OVERHEAD + len(payload)`` bytes: no copies."""
    header = HEADER.pack(FORMAT_VERSION, otype, flags, 0, nonce)
    view = memoryview(out)
    if len(view) != OVERHEAD + len(payload):
        raise ValueError("seal_into: the output must be OVERHEAD + len(payload) bytes")
    view[: HEADER.size] = header
    aead.encrypt_into(nonce, payload, _ad(header, name, extra), view[HEADER.size :])


def unseal(
    aead: AESGCM,
    otype: ObjectType,
    name: str,
    sealed: bytes | memoryview,
    *,
    extra: bytes = b"",
    max_size: int,
    what: str | None = None,
) -> bytes:
    """Authenticate, decrypt and decompress one sealed unit, or raise ``IntegrityError``."""
    label = what or name
    if len(sealed) < OVERHEAD:
        raise IntegrityError(label, f"truncated ({len(sealed)} bytes)")
    version, t, flags, _res, nonce = HEADER.unpack_from(sealed, 0)
    if version != FORMAT_VERSION:
        raise IntegrityError(label, f"unknown format version {version}")
    if flags & ~FLAG_ZSTD or _res:
        raise IntegrityError(label, f"unknown flags {flags:#x}/{_res:#x}")
    if t != otype:
        raise IntegrityError(label, f"object type {t} where {int(otype)} was expected")
    header = bytes(sealed[:4])
    try:
        payload = aead.decrypt(nonce, memoryview(sealed)[HEADER.size :],
                               _ad(header, name, extra))
    except InvalidTag:
        raise IntegrityError(label, "authentication failed") from None
    if flags & FLAG_ZSTD:
        try:
            # max_output_size only bounds frames that do not declare their size.
            if zstandard.frame_content_size(payload) > max_size:
                raise IntegrityError(label, f"payload larger than {max_size} bytes")
            payload = _decompressor().decompress(payload, max_output_size=max_size)
        except zstandard.ZstdError as e:
            raise IntegrityError(label, f"decompression failed: {e}") from None
    if len(payload) > max_size:
        raise IntegrityError(label, f"payload larger than {max_size} bytes")
    return payload


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    # One per thread (zstandard objects must not be shared); each call starts afresh.
    d: zstandard.ZstdDecompressor | None = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d
