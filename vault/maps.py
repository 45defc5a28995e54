"""Block maps: for one disk at one recovery point, block number -> block id.

Plaintext::

    offset  size  field
    0       1     kind: 0 = full, 1 = delta
    1       8     u64 disk size in bytes
    9       4     u32 block size
    13      4     u32 entry count
    17      40*n  entries, sorted by block number: u64 block number | id[32]

A full map lists every non-zero block. A delta map lists the blocks that changed
since its base point; an all-zero id there means "this block is now zero".
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from vault.crypto import Keyring, ObjectType, seal, unseal
from vault.errors import IntegrityError

HEAD = struct.Struct("<BQII")
ENTRY = struct.Struct("<Q32s")
ZERO_ID = bytes(32)
FULL, DELTA = 0, 1
MAX_MAP = 1 << 31


@dataclass
class BlockMap:
    kind: int
    size: int
    block_size: int
    blocks: dict[int, bytes]


def encode_map(m: BlockMap) -> bytes:
    items = sorted(m.blocks.items())
    return HEAD.pack(m.kind, m.size, m.block_size, len(items)) + b"".join(
        ENTRY.pack(n, bid) for n, bid in items
    )


class MapBuilder:
    """A map's plaintext written entry by entry in increasing block order (40 bytes an
    entry), for a map made from ranges (``vault/mapranges.py``) without a dict of it;
    the same bytes ``encode_map`` gives for the same entries."""

    def __init__(self, kind: int, size: int, block_size: int) -> None:
        self.kind, self.size, self.block_size = kind, size, block_size
        self._body = bytearray()
        self._count = 0
        self._last = -1

    def extend(self, entries: Iterable[tuple[int, bytes]]) -> None:
        """Append ``(block number, id)`` entries, in increasing block order."""
        for n, bid in entries:
            if n <= self._last:
                raise ValueError(f"map entries go in increasing block order: {n} after "
                                 f"{self._last}")
            self._body += ENTRY.pack(n, bid)
            self._last = n
            self._count += 1

    def body(self) -> memoryview:
        """The entries written so far (the plaintext without its header)."""
        return memoryview(self._body)

    def plaintext(self) -> bytes:
        return HEAD.pack(self.kind, self.size, self.block_size, self._count) + self._body

    def close(self) -> None:
        """Nothing to free: ``MapSpool``'s counterpart (``Vault.map_writer`` gives
        either)."""


@dataclass(frozen=True)
class MapEntries:
    """A map read as its plaintext, not as a dict (vault/fpstream.py): what it costs is
    its 40 bytes an entry; ``iter`` yields the entries in order, checked as they come."""

    kind: int
    size: int
    block_size: int
    count: int
    body: memoryview
    what: str

    @property
    def firsts(self) -> Sequence[int]:
        """One chunk, the whole body (a format 1 map is sealed whole)."""
        return (0,)

    async def chunk(self, i: int) -> memoryview:
        """The whole body (``i`` is 0): its order is checked by whoever walks it."""
        return self.body

    def iter(self) -> Iterator[tuple[int, bytes]]:
        """``(block number, id)`` in increasing block order; ``IntegrityError`` at an entry
        beyond the disk or out of order (a dict would have hidden that)."""
        nblocks = (self.size + self.block_size - 1) // self.block_size
        last = -1
        for n, bid in ENTRY.iter_unpack(self.body):
            if not last < n < nblocks:
                raise IntegrityError(self.what, f"block {n} lies beyond the disk's {nblocks} "
                                     "blocks or out of order")
            last = n
            yield n, bid


class MapView(Protocol):
    """A map as its readers go through it: a sequence of chunks of sorted 40-byte entries
    (``firsts``: each chunk's first block number), read when asked for. A format 1 map
    (``MapEntries``) is one chunk, held; a format 2 map (``vault/mapchunks.py``) reads
    its chunks from the store, each checked as it comes."""

    @property
    def kind(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def what(self) -> str: ...
    @property
    def firsts(self) -> Sequence[int]: ...

    async def chunk(self, i: int) -> memoryview: ...


def map_entries(plain: bytes | memoryview, what: str) -> MapEntries:
    """The header of a map's plaintext, and its entries to be iterated."""
    if len(plain) < HEAD.size:
        raise IntegrityError(what, "map is truncated")
    kind, size, bs, count = HEAD.unpack_from(plain, 0)
    if len(plain) != HEAD.size + count * ENTRY.size or kind not in (FULL, DELTA) or bs == 0:
        raise IntegrityError(what, "map header does not match its body")
    return MapEntries(kind, size, bs, count, memoryview(plain)[HEAD.size:], what)


def decode_map(plain: bytes, what: str) -> BlockMap:
    if len(plain) < HEAD.size:
        raise IntegrityError(what, "map is truncated")
    kind, size, bs, count = HEAD.unpack_from(plain, 0)
    if len(plain) != HEAD.size + count * ENTRY.size or kind not in (FULL, DELTA) or bs == 0:
        raise IntegrityError(what, "map header does not match its body")
    nblocks = (size + bs - 1) // bs
    blocks: dict[int, bytes] = {}
    for n, bid in ENTRY.iter_unpack(plain[HEAD.size :]):
        if n >= nblocks:
            raise IntegrityError(what, f"block {n} lies beyond the disk's {nblocks} blocks")
        blocks[n] = bid
    return BlockMap(kind, size, bs, blocks)


def seal_map(keyring: Keyring, name_id: str, m: BlockMap) -> bytes:
    return seal_map_plaintext(keyring, name_id, encode_map(m))


def seal_map_plaintext(keyring: Keyring, name_id: str, plain: bytes) -> bytes:
    return seal(keyring.aead(ObjectType.MAP, name_id), ObjectType.MAP, name_id, plain)


def open_map(keyring: Keyring, name_id: str, sealed: bytes) -> BlockMap:
    what = f"maps/{name_id}"
    return decode_map(_unseal(keyring, name_id, sealed, what), what)


def open_map_entries(keyring: Keyring, name_id: str, sealed: bytes) -> MapEntries:
    """A sealed map authenticated and read as ``MapEntries`` (no dict of it is built)."""
    what = f"maps/{name_id}"
    return map_entries(_unseal(keyring, name_id, sealed, what), what)


def _unseal(keyring: Keyring, name_id: str, sealed: bytes, what: str) -> bytes:
    return unseal(keyring.aead(ObjectType.MAP, name_id), ObjectType.MAP, name_id, sealed,
                  max_size=MAX_MAP, what=what)
