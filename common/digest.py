"""The disk digest: an end-to-end check from the agent's read to the restored bytes.

``digest = BLAKE3(xxh3_128(block_0) || xxh3_128(block_1) || ...)`` over every block
of the disk in order (zero blocks included, the last block possibly short). The
agent already computes the per-block fingerprints for change tracking, so the
digest costs it nothing extra; materialize recomputes it from what it wrote.
"""

from __future__ import annotations

import mmap

import blake3
import xxhash


def fingerprint(block: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(block)


_ZEROS: dict[int, bytes] = {}  # a block of zeros by length, to compare with


def zero_block(length: int) -> bytes:
    """``length`` zero bytes (made once per length: a disk has few block lengths)."""
    zeros = _ZEROS.get(length)
    if zeros is None:
        zeros = _ZEROS[length] = bytes(length)
    return zeros


_ZERO_FPS: dict[int, bytes] = {}


def zero_fingerprint(length: int) -> bytes:
    """The fingerprint of ``length`` zero bytes (a zero block's, or a disk's short last
    one), made once per length."""
    fp = _ZERO_FPS.get(length)
    if fp is None:
        fp = _ZERO_FPS[length] = fingerprint(zero_block(length))
    return fp


def is_zero(block: bytes | memoryview) -> bool:
    """Whether every byte of ``block`` is zero (an empty block is).

    The ends first: almost every other block has a non-zero byte there. Then bytes with
    bytes, one memcmp: a memoryview (a block of a chunk read, of a mapped segment)
    compares with bytes one item at a time, ~40x slower than its copy and a memcmp."""
    if not block:
        return True
    if block[0] or block[-1]:
        return False
    return bytes(block) == zero_block(len(block))


class DiskDigest:
    def __init__(self) -> None:
        self._h = blake3.blake3()

    def update(self, fp: bytes) -> None:
        self._h.update(fp)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest_of_fingerprint_map(fps: bytes | bytearray | memoryview | mmap.mmap) -> str:
    """The digest of a disk given the concatenation of its blocks' fingerprints."""
    return blake3.blake3(fps).hexdigest()


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size
