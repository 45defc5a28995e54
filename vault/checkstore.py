"""What ``check`` holds per block, in memory or in a SQLite file within a memory budget.

``check`` keeps, besides the block index (an ``Index``, or a ``DiskIndex`` in the same
temporary directory), the entries every index object gives for each pack (their union:
what a pack's trailer must include) and, with ``--read-data``, the fingerprint of every
block that verified (for the disk digests). ``MemoryListing`` holds them in dicts, about
340 bytes a block; ``DiskListing`` in the tables ``listed(pack, id, off, len)`` (keyed by
pack first: a pack's entries are one range) and ``fps(id, fp)`` of a SQLite file in a
temporary directory, behind a page cache of its share of the budget. Both answer the
same questions; what stays in memory grows with the number of packs only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from vault.pack import PackEntry

_CHUNK = 500  # ids per SELECT ... IN (...)


class Listing(Protocol):
    def add(self, pack_id: str, entries: list[PackEntry]) -> None:
        """Record entries an index object gives for ``pack_id``."""
        ...

    def finish(self) -> None:
        """Called once every index object is added, before the questions below."""
        ...

    def packs(self) -> list[str]:
        """Every pack an index object lists, in id order."""
        ...

    def __contains__(self, pack_id: object) -> bool: ...

    def summary(self, pack_id: str) -> tuple[int, int]:
        """How many distinct entries the index gives for the pack, and the end of the
        last one (0 if none)."""
        ...

    def entries(self, pack_id: str) -> set[PackEntry]:
        """The distinct entries the index gives for the pack (empty if none)."""
        ...

    def put_fps(self, fps: list[tuple[bytes, bytes]]) -> None:
        """Record ``(block id, fingerprint)`` of blocks that verified."""
        ...

    def get_fps(self, block_ids: Iterable[bytes]) -> dict[bytes, bytes]:
        """The fingerprints recorded of those of ``block_ids`` that have one."""
        ...

    def close(self) -> None: ...


class MemoryListing:
    def __init__(self) -> None:
        self._by_pack: dict[str, set[PackEntry]] = {}
        self._fps: dict[bytes, bytes] = {}

    def add(self, pack_id: str, entries: list[PackEntry]) -> None:
        self._by_pack.setdefault(pack_id, set()).update(entries)

    def finish(self) -> None:
        pass

    def packs(self) -> list[str]:
        return sorted(self._by_pack)

    def __contains__(self, pack_id: object) -> bool:
        return pack_id in self._by_pack

    def summary(self, pack_id: str) -> tuple[int, int]:
        entries = self._by_pack.get(pack_id, set())
        return len(entries), max((e.offset + e.length for e in entries), default=0)

    def entries(self, pack_id: str) -> set[PackEntry]:
        return self._by_pack.get(pack_id, set())

    def put_fps(self, fps: list[tuple[bytes, bytes]]) -> None:
        self._fps.update(fps)

    def get_fps(self, block_ids: Iterable[bytes]) -> dict[bytes, bytes]:
        got = self._fps
        return {b: fp for b in block_ids if (fp := got.get(b)) is not None}

    def close(self) -> None:
        self._by_pack.clear()
        self._fps.clear()


class DiskListing:
    def __init__(self, path: Path, cache_bytes: int) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")  # a scratch file: never reopened
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(f"PRAGMA cache_size=-{max(cache_bytes >> 10, 1024)}")
        self._db.executescript("""
            CREATE TABLE listed (pack TEXT NOT NULL, id BLOB NOT NULL, off INTEGER NOT NULL,
                                 len INTEGER NOT NULL, PRIMARY KEY (pack, id, off, len))
                WITHOUT ROWID;
            CREATE TABLE fps (id BLOB PRIMARY KEY, fp BLOB NOT NULL) WITHOUT ROWID;
        """)
        self._summary: dict[str, tuple[int, int]] = {}

    def add(self, pack_id: str, entries: list[PackEntry]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO listed VALUES (?, ?, ?, ?)",
                             [(pack_id, e.block_id, e.offset, e.length) for e in entries])

    def finish(self) -> None:
        self._summary = {p: (n, end) for p, n, end in self._db.execute(
            "SELECT pack, count(*), max(off + len) FROM listed GROUP BY pack")}

    def packs(self) -> list[str]:
        return sorted(self._summary)

    def __contains__(self, pack_id: object) -> bool:
        return pack_id in self._summary

    def summary(self, pack_id: str) -> tuple[int, int]:
        return self._summary.get(pack_id, (0, 0))

    def entries(self, pack_id: str) -> set[PackEntry]:
        return {PackEntry(b, off, ln) for b, off, ln in self._db.execute(
            "SELECT id, off, len FROM listed WHERE pack = ?", (pack_id,))}

    def put_fps(self, fps: list[tuple[bytes, bytes]]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO fps VALUES (?, ?)", fps)

    def get_fps(self, block_ids: Iterable[bytes]) -> dict[bytes, bytes]:
        ids = sorted(set(block_ids))
        out: dict[bytes, bytes] = {}
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            out.update(self._db.execute(
                "SELECT id, fp FROM fps WHERE id IN (" + ",".join("?" * len(chunk)) + ")",
                chunk))
        return out

    def close(self) -> None:
        self._db.close()
