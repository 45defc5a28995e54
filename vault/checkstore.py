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
    """Rows are appended to unkeyed tables as they come (in load order, cheap) and moved
    into the keyed ones in one sorted pass (SQLite's external sort) before the first
    question: inserting random ids into a B-tree one by one rewrites most of its pages
    again and again once it outgrows the cache."""

    def __init__(self, path: Path, cache_bytes: int) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")  # a scratch file: never reopened
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(f"PRAGMA cache_size=-{max(cache_bytes >> 10, 1024)}")
        self._db.executescript("""
            CREATE TABLE listed_in (pack INTEGER, id BLOB, off INTEGER, len INTEGER);
            CREATE TABLE listed (pack INTEGER NOT NULL, id BLOB NOT NULL,
                                 off INTEGER NOT NULL, len INTEGER NOT NULL,
                                 PRIMARY KEY (pack, id, off, len)) WITHOUT ROWID;
            CREATE TABLE fps_in (id BLOB, fp BLOB);
            CREATE TABLE fps (id BLOB PRIMARY KEY, fp BLOB NOT NULL) WITHOUT ROWID;
        """)
        self._pack_n: dict[str, int] = {}
        self._summary: dict[str, tuple[int, int]] = {}
        self._fps_pending = False

    def add(self, pack_id: str, entries: list[PackEntry]) -> None:
        n = self._pack_n.setdefault(pack_id, len(self._pack_n))
        self._append("INSERT INTO listed_in VALUES (?, ?, ?, ?)",
                     [(n, e.block_id, e.offset, e.length) for e in entries])

    def _append(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        # One transaction: outside of one, every row would be a transaction of its own.
        self._db.execute("BEGIN")
        self._db.executemany(sql, rows)
        self._db.execute("COMMIT")

    def finish(self) -> None:
        db = self._db
        db.execute("BEGIN")
        db.execute("INSERT OR IGNORE INTO listed SELECT * FROM listed_in "
                   "ORDER BY pack, id, off, len")
        db.execute("DELETE FROM listed_in")
        db.execute("COMMIT")
        names = {n: p for p, n in self._pack_n.items()}
        self._summary = {names[n]: (count, end) for n, count, end in db.execute(
            "SELECT pack, count(*), max(off + len) FROM listed GROUP BY pack")}

    def packs(self) -> list[str]:
        return sorted(self._summary)

    def __contains__(self, pack_id: object) -> bool:
        return pack_id in self._summary

    def summary(self, pack_id: str) -> tuple[int, int]:
        return self._summary.get(pack_id, (0, 0))

    def entries(self, pack_id: str) -> set[PackEntry]:
        n = self._pack_n.get(pack_id)
        if n is None:
            return set()
        return {PackEntry(b, off, ln) for b, off, ln in self._db.execute(
            "SELECT id, off, len FROM listed WHERE pack = ?", (n,))}

    def put_fps(self, fps: list[tuple[bytes, bytes]]) -> None:
        self._append("INSERT INTO fps_in VALUES (?, ?)", list(fps))
        self._fps_pending = True

    def get_fps(self, block_ids: Iterable[bytes]) -> dict[bytes, bytes]:
        db = self._db
        if self._fps_pending:  # a later fingerprint of a block replaces an earlier one
            db.execute("BEGIN")
            db.execute("INSERT OR REPLACE INTO fps SELECT id, fp FROM fps_in ORDER BY id, rowid")
            db.execute("DELETE FROM fps_in")
            db.execute("COMMIT")
            self._fps_pending = False
        ids = sorted(set(block_ids))
        out: dict[bytes, bytes] = {}
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            out.update(db.execute(
                "SELECT id, fp FROM fps WHERE id IN (" + ",".join("?" * len(chunk)) + ")",
                chunk))
        return out

    def close(self) -> None:
        self._db.close()
