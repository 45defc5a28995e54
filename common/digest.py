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
