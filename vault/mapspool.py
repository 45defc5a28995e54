"""``MapSpool``: a chunked block map (format 2 on) sealed into a file as its entries come,
then put from the file a part at a time (``BlobStore.put_file``).

A map holds 40 bytes of plaintext an entry: the full map of a 2 TiB disk of 64 KiB
blocks is 1.3 GB, and built in memory it was held twice over when it was put (the
plaintext, then the sealed object). A spool holds one chunk of plaintext and the
table's rows (28 bytes a chunk of 65 536 entries); the sealed chunks go to a nameless
file in ``spool_dir`` (``common/scratch.py``: gone with the process, even after a
``kill -9``). The bytes are ``seal_chunked``'s for the same entries.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable

from common.scratch import scratch_file, write_all
from vault import names
from vault.crypto import Keyring
from vault.mapchunks import CHUNK_ENTRIES, ChunkSealer
from vault.store.protocol import BlobStore


class MapSpool:
    """``extend`` with entries in increasing block order, then ``put`` once; ``close``
    (or collection) frees the file."""

    def __init__(self, keyring: Keyring, kind: int, size: int, block_size: int, *,
                 chunk_entries: int = CHUNK_ENTRIES,
                 spool_dir: str | os.PathLike[str] | None = None) -> None:
        self.map_id = names.random_id()
        self._fd = scratch_file(spool_dir)
        self._closer = weakref.finalize(self, os.close, self._fd)
        self._sealer = ChunkSealer(keyring, self.map_id, kind, size, block_size,
                                   self._write, chunk_entries)
        self.length = 0  # bytes written to the file

    @property
    def count(self) -> int:
        """Entries sealed so far (all of them after ``put``)."""
        return self._sealer.count

    def extend(self, entries: Iterable[tuple[int, bytes]]) -> None:
        """Append ``(block number, id)`` entries, in increasing block order."""
        self._sealer.extend(entries)

    def _write(self, data: bytes) -> None:
        write_all(self._fd, data)
        self.length += len(data)

    async def put(self, store: BlobStore) -> str:
        """Seal the rest, put the map (``maps/<id>``) and return its id."""
        self._sealer.finish()
        await store.put_file(names.MAPS + self.map_id, self._fd, self.length)
        return self.map_id

    def close(self) -> None:
        self._closer()
