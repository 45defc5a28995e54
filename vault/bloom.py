"""A Bloom filter of block ids: "certainly not indexed" without a read of the index.

Block ids are keyed hashes, uniform already, so the bit positions are slices of the id
itself: ``K`` 32-bit words of its first bytes, each masked to the filter's size (a power
of two, at least ``BITS_PER_KEY`` bits per expected key: under 1 % false positives).
It holds about 1.25-2.5 bytes per key.

File layout (``save`` / ``load``): ``token[16] | u64 nbits | u64 count | bits``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

K = 6
BITS_PER_KEY = 10
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
        h = int.from_bytes(key[: 4 * K], "little")
        for _ in range(K):
            p = h & mask
            bits[p >> 3] |= 1 << (p & 7)
            h >>= 32
        self.count += 1

    def update(self, keys: Iterable[bytes]) -> None:
        for k in keys:
            self.add(k)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes):
            return False
        bits, mask = self.bits, self.mask
        h = int.from_bytes(key[: 4 * K], "little")
        for _ in range(K):
            p = h & mask
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
            h >>= 32
        return True

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
