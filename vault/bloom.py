"""A Bloom filter of block ids: "certainly not indexed" without a read of the index.

Block ids are keyed hashes, uniform already, so the bit positions are slices of the id
itself: two 32-bit words of its first bytes, each masked to the filter's size (a power
of two, at least ``BITS_PER_KEY`` bits per expected key: 0.7-2.5 % false positives,
each of which costs one read of the table). It holds 1.5-3 bytes per key. Two
positions, not the optimal eight: adding a key is Python code run once per block of the
vault when the index is built, and two make it about four times cheaper.

File layout (``save`` / ``load``): ``token[16] | u64 nbits | u64 count | bits``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

BITS_PER_KEY = 12
MIN_BITS = 1 << 16
_HEADER = struct.Struct("<16sQQ")


class BloomFilter:
    def __init__(self, capacity: int, *, bits: bytearray | None = None, count: int = 0
                 ) -> None:
        if bits is None:
            nbits = MIN_BITS
            while nbits < capacity * BITS_PER_KEY:
                nbits <<= 1
            bits = bytearray(nbits >> 3)
        self.bits = bits
        self.mask = (len(bits) << 3) - 1
        self.count = count  # keys added (with repeats): when it outgrows the size, rebuild

    @property
    def capacity(self) -> int:
        """How many keys it holds at its designed false-positive rate."""
        return (len(self.bits) << 3) // BITS_PER_KEY

    def add(self, key: bytes) -> None:
        bits, mask = self.bits, self.mask
        p = int.from_bytes(key[:4], "little") & mask
        bits[p >> 3] |= 1 << (p & 7)
        p = int.from_bytes(key[4:8], "little") & mask
        bits[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def update(self, keys: Iterable[bytes]) -> None:
        bits, mask, n = self.bits, self.mask, 0
        for key in keys:
            p = int.from_bytes(key[:4], "little") & mask
            bits[p >> 3] |= 1 << (p & 7)
            p = int.from_bytes(key[4:8], "little") & mask
            bits[p >> 3] |= 1 << (p & 7)
            n += 1
        self.count += n

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes):
            return False
        bits, mask = self.bits, self.mask
        p = int.from_bytes(key[:4], "little") & mask
        if not bits[p >> 3] & (1 << (p & 7)):
            return False
        p = int.from_bytes(key[4:8], "little") & mask
        return bool(bits[p >> 3] & (1 << (p & 7)))

    def save(self, path: Path, token: bytes) -> None:
        """Write it to ``path`` (a temporary name, then a rename), tagged with ``token``."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(token, len(self.bits) << 3, self.count))
            f.write(self.bits)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, token: bytes) -> BloomFilter | None:
        """The filter saved at ``path`` with ``token``; None if it is missing, torn or
        tagged with another token (stale)."""
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
                if len(head) != _HEADER.size:
                    return None
                got, nbits, count = _HEADER.unpack(head)
                if got != token or nbits < MIN_BITS or nbits & (nbits - 1):
                    return None
                bits = bytearray(f.read(nbits >> 3))
        except OSError:
            return None
        if len(bits) != nbits >> 3:
            return None
        return cls(0, bits=bits, count=count)
