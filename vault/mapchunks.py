"""Chunked block maps (points of format 2): a map sealed in chunks of at most
``CHUNK_ENTRIES`` entries, with a sealed table saying which blocks each chunk covers,
so a reader holds the chunks of the range it is at, never the whole map.

Object layout (``maps/<id>``)::

    offset   size  field
    0        ...   sealed chunk 0 (ObjectType.MAP_CHUNK, nonce = counter 0, extra = u32 0)
    ...      ...   sealed chunk i (nonce = counter i, extra = u32 LE i)
    T        t     sealed table (ObjectType.MAP, random nonce)
    T+t      4     u32 LE t
    T+t+4    4     magic b"SRMC"

Table plaintext: ``u8 kind | u64 disk size | u32 block size | u64 entry count |
u32 chunk count`` then per chunk ``u64 first block | u64 last block | u32 entries |
u64 offset | u32 length``. Chunk plaintext: its entries, ``u64 block number | id[32]``,
sorted (as a format 1 map's body). A chunk is checked when it is read: authenticated
at its place in the map (its index is in the associated data), its entries sorted,
the first and the last the table's, their count the table's. The table is checked when
the map is opened: chunks in increasing, disjoint block order, within the disk, their
counts adding up, each lying before the table.
"""

from __future__ import annotations

import operator
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from vault import names
from vault.crypto import OVERHEAD, Keyring, ObjectType, counter_nonce, seal, unseal
from vault.errors import IntegrityError, MissingObjectError, NotFoundError, PermanentStoreError
from vault.maps import DELTA, ENTRY, FULL
from vault.store.protocol import BlobStore

CHUNK_ENTRIES = 1 << 16  # entries a chunk the writer makes: 2.6 MB of plaintext
MAX_CHUNK_ENTRIES = 1 << 20  # the most a reader takes (any writer's choice up to it)
MAGIC = b"SRMC"
TAIL = struct.Struct("<I4s")
HEAD = struct.Struct("<BQIQI")
CHUNK = struct.Struct("<QQIQI")
INDEX = struct.Struct("<I")
MAX_TABLE = 64 << 20
MAX_CHUNK = MAX_CHUNK_ENTRIES * ENTRY.size
CACHED = 2  # chunks a map keeps after they were asked for (its readers hold their own)


@dataclass(frozen=True, slots=True)
class Chunk:
    first: int  # block number of its first entry
    last: int  # block number of its last entry
    count: int
    offset: int
    length: int


def seal_chunked(keyring: Keyring, map_id: str, kind: int, size: int, block_size: int,
                 body: bytes | memoryview, chunk_entries: int = CHUNK_ENTRIES, *,
                 table_nonce: bytes | None = None) -> bytes:
    """The object of a map whose sorted entries (40 bytes each, a format 1 map's body)
    are ``body``: its chunks of ``chunk_entries`` entries, its table and its tail
    (``table_nonce``: for test vectors only; a random one otherwise)."""
    parts: list[bytes] = []
    sealer = ChunkSealer(keyring, map_id, kind, size, block_size, parts.append,
                         chunk_entries)
    sealer.add_body(memoryview(body))
    sealer.finish(table_nonce=table_nonce)
    return b"".join(parts)


class ChunkSealer:
    """A chunked map's object written as its entries come: each chunk sealed and handed
    to ``write`` once it holds ``chunk_entries`` entries, the table and the tail by
    ``finish``. Holds one chunk's plaintext and the table's rows (28 bytes a chunk), so
    a map of any size is written in bounded memory; the bytes are ``seal_chunked``'s."""

    def __init__(self, keyring: Keyring, map_id: str, kind: int, size: int,
                 block_size: int, write: Callable[[bytes], object],
                 chunk_entries: int = CHUNK_ENTRIES) -> None:
        if not 0 < chunk_entries <= MAX_CHUNK_ENTRIES:
            raise ValueError(f"a chunk holds 1 to {MAX_CHUNK_ENTRIES} entries, not "
                             f"{chunk_entries}")
        self.keyring, self.map_id = keyring, map_id
        self.kind, self.size, self.block_size = kind, size, block_size
        self._write, self._per_chunk = write, chunk_entries
        self._aead = keyring.aead(ObjectType.MAP_CHUNK, map_id)
        self._buf = bytearray()  # the chunk being filled
        self._rows: list[bytes] = []
        self._offset = 0  # bytes handed to ``write``
        self.count = 0  # entries
        self._last = -1

    def extend(self, entries: Iterable[tuple[int, bytes]]) -> None:
        """Append ``(block number, id)`` entries, in increasing block order."""
        buf, pack, full = self._buf, ENTRY.pack, self._per_chunk * ENTRY.size
        last = self._last
        for n, bid in entries:
            if n <= last:
                raise ValueError(f"map entries go in increasing block order: {n} after "
                                 f"{last}")
            buf += pack(n, bid)
            last = n
            if len(buf) >= full:
                self._last = last
                self._seal_chunk()
                buf = self._buf
        self._last = last

    def add_body(self, body: memoryview) -> None:
        """Append entries already laid out (a format 1 map's body, sorted: its order is
        not checked again)."""
        full = self._per_chunk * ENTRY.size
        while body:
            take = full - len(self._buf)
            self._buf += body[:take]
            body = body[take:]
            if len(self._buf) >= full:
                self._seal_chunk()

    def _seal_chunk(self) -> None:
        part = self._buf
        if not part:
            return
        i = len(self._rows)
        first = struct.unpack_from("<Q", part, 0)[0]
        last = struct.unpack_from("<Q", part, len(part) - ENTRY.size)[0]
        sealed = seal(self._aead, ObjectType.MAP_CHUNK, self.map_id, memoryview(part),
                      nonce=counter_nonce(i), extra=INDEX.pack(i))
        self._write(sealed)
        entries = len(part) // ENTRY.size
        self._rows.append(CHUNK.pack(first, last, entries, self._offset, len(sealed)))
        self._offset += len(sealed)
        self.count += entries
        self._buf = bytearray()

    def finish(self, *, table_nonce: bytes | None = None) -> int:
        """Seal the last chunk, write the table and the tail; the object's length."""
        self._seal_chunk()
        plain = (HEAD.pack(self.kind, self.size, self.block_size, self.count,
                           len(self._rows)) + b"".join(self._rows))
        table = seal(self.keyring.aead(ObjectType.MAP, self.map_id), ObjectType.MAP,
                     self.map_id, plain, nonce=table_nonce)
        tail = table + TAIL.pack(len(table), MAGIC)
        self._write(tail)
        return self._offset + len(tail)


def parse_table(keyring: Keyring, map_id: str, sealed: bytes | memoryview,
                table_offset: int) -> tuple[int, int, int, int, list[Chunk]]:
    """``(kind, size, block size, entry count, chunks)`` of a sealed table that starts at
    ``table_offset`` of its object, checked as the module's docstring says."""
    what = names.MAPS + map_id
    plain = unseal(keyring.aead(ObjectType.MAP, map_id), ObjectType.MAP, map_id, sealed,
                   max_size=MAX_TABLE, what=what)
    if len(plain) < HEAD.size:
        raise IntegrityError(what, "map table is truncated")
    kind, size, bs, count, nchunks = HEAD.unpack_from(plain, 0)
    if len(plain) != HEAD.size + nchunks * CHUNK.size or kind not in (FULL, DELTA) or bs == 0:
        raise IntegrityError(what, "map table's header does not match its body")
    nblocks = (size + bs - 1) // bs
    chunks = [Chunk(*CHUNK.unpack_from(plain, HEAD.size + i * CHUNK.size))
              for i in range(nchunks)]
    last, end, total = -1, 0, 0
    for c in chunks:
        if not (last < c.first <= c.last < nblocks and 0 < c.count <= MAX_CHUNK_ENTRIES
                and c.count <= c.last - c.first + 1):
            raise IntegrityError(what, f"map chunk of blocks {c.first}-{c.last} lies beyond "
                                       f"the disk's {nblocks} blocks or out of order")
        if c.offset != end or c.length > MAX_CHUNK + OVERHEAD:
            raise IntegrityError(what, "map chunks do not follow one another")
        last, end, total = c.last, c.offset + c.length, total + c.count
    if end != table_offset or total != count:
        raise IntegrityError(what, "map table does not match its chunks")
    return kind, size, bs, count, chunks


class ChunkedMap:
    """A format 2 map opened by its table: its chunks are read when asked for
    (``chunk``), each checked, the last ``CACHED`` kept for the next reader."""

    def __init__(self, store: BlobStore, keyring: Keyring, map_id: str, kind: int,
                 size: int, block_size: int, count: int, chunks: list[Chunk]) -> None:
        self.store, self.keyring, self.map_id = store, keyring, map_id
        self.kind, self.size, self.block_size, self.count = kind, size, block_size, count
        self.chunks = chunks
        self.firsts: Sequence[int] = [c.first for c in chunks]
        self.what = names.MAPS + map_id
        self._cache: OrderedDict[int, memoryview] = OrderedDict()

    async def chunk(self, i: int) -> memoryview:
        """The entries of chunk ``i``, authenticated and checked; ``IntegrityError``."""
        got = self._cache.get(i)
        if got is not None:
            self._cache.move_to_end(i)
            return got
        c = self.chunks[i]
        sealed = await _get(self.store, self.what, c.offset, c.length)
        plain = unseal(self.keyring.aead(ObjectType.MAP_CHUNK, self.map_id),
                       ObjectType.MAP_CHUNK, self.map_id, sealed, extra=INDEX.pack(i),
                       max_size=MAX_CHUNK, what=f"{self.what} chunk {i}")
        view = memoryview(plain)
        if len(view) != c.count * ENTRY.size:
            raise IntegrityError(self.what, f"chunk {i} holds {len(view) // ENTRY.size} "
                                            f"entries, its table says {c.count}")
        if c.count and not increasing(view, c.first, c.last):
            raise IntegrityError(self.what, f"chunk {i}: its blocks are out of order or "
                                            "not the ones its table says")
        self._cache[i] = view
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return view


def increasing(body: memoryview, first: int, last: int) -> bool:
    """Whether the block numbers of a run of 40-byte entries go strictly up from
    ``first`` to ``last`` (read in place, in C: nothing the size of the run is made)."""
    numbers: Sequence[int]
    if sys.byteorder == "little":
        numbers = body.cast("B").cast("Q")[::ENTRY.size // 8]
    else:  # pragma: no cover - the machines this runs on are little-endian
        numbers = [n for (n,) in struct.iter_unpack("<Q8x8x8x8x", body)]
    return (numbers[0] == first and numbers[-1] == last
            and all(map(operator.lt, numbers, numbers[1:])))


async def open_chunked(store: BlobStore, keyring: Keyring, map_id: str) -> ChunkedMap:
    """A format 2 map opened by its table (its chunks are read later, when asked for);
    ``MissingObjectError`` if it is not in the store, ``IntegrityError`` if damaged."""
    what = names.MAPS + map_id
    try:
        size = (await store.stat(what)).size
    except NotFoundError:
        raise MissingObjectError(what, "the map is missing") from None
    if size < TAIL.size:
        raise IntegrityError(what, "map is truncated")
    tlen, magic = TAIL.unpack(await _get(store, what, size - TAIL.size, TAIL.size))
    if magic != MAGIC or tlen > size - TAIL.size:
        raise IntegrityError(what, "map has no chunk table (not a format 2 map, or cut "
                                   "short)")
    start = size - TAIL.size - tlen
    table = await _get(store, what, start, tlen)
    kind, dsize, bs, count, chunks = parse_table(keyring, map_id, table, start)
    return ChunkedMap(store, keyring, map_id, kind, dsize, bs, count, chunks)


async def _get(store: BlobStore, what: str, offset: int, length: int) -> bytes:
    try:
        got = await store.get(what, offset, length)
    except NotFoundError:
        raise MissingObjectError(what, "the map is missing") from None
    except PermanentStoreError:
        raise IntegrityError(what, "the map is shorter than its table says") from None
    if len(got) != length:
        raise IntegrityError(what, "the map is shorter than its table says")
    return got
