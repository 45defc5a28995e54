"""``DiskIndex``: the block index in a SQLite file on local disk, not in memory.

A cache of the vault's index objects, never the truth: it can be deleted at any time and
is rebuilt from them (``Vault.refresh_index``). In ``<dir>/<vault id>.index.sqlite``:

- ``blocks(id BLOB PRIMARY KEY, pack, off, len) WITHOUT ROWID``: the 32-byte block id
  keys the B-tree itself, a row is about 50 bytes on disk; ``pack`` numbers a row of
- ``packs(n INTEGER PRIMARY KEY, id BLOB UNIQUE)``, the 32-byte pack ids;
- ``objects(name)``: the index objects loaded, each in the same transaction as its
  entries, so a kill -9 mid-build (or mid-refresh) leaves whole objects only, and the
  next refresh loads the ones missing;
- ``staging``: where those entries are appended, in load order; the next read moves
  them into ``blocks`` in one transaction, sorted by id (SQLite's external sort), so a
  build of many objects fills the B-tree in key order, each page written about once,
  instead of touching most of its pages again for every object (random ids);
- ``meta``: the vault id and layout version (another vault's file or an older layout is
  discarded), and the token of the saved Bloom filter.

In memory: the sets of objects and packs (a few dozen bytes per pack, not per block) and
a Bloom filter of the block ids (vault/bloom.py, 1.5-3 bytes a block) that answers
"certainly new" for most blocks of a cycle without a read. The filter is saved beside
the file on ``close`` (``<file>.filter``) with a token recorded in ``meta``; the token is
cleared at open, before anything changes, so a filter that a kill left behind is stale
and rebuilt by a scan of the ids. A file SQLite cannot read is deleted and rebuilt.
Journal: WAL, ``synchronous=NORMAL`` (a power loss may lose the last objects loaded,
never leave a torn one: they are loaded again).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

from vault.bloom import BloomFilter
from vault.errors import VaultError
from vault.index import Location
from vault.pack import PackEntry

VERSION = "1"
DEFAULT_CACHE = 16 << 20  # SQLite's page cache
_CHUNK = 500  # ids per SELECT ... IN (...)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packs (n INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS objects (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (
    id BLOB PRIMARY KEY, pack INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staging (
    id BLOB NOT NULL, pack INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL
);
"""


class _Unusable(Exception):
    pass


class DiskIndex:
    """A ``BlockIndex`` (vault/index.py) kept in a SQLite file; see the module."""

    def __init__(self, path: Path, vault_id: str, *, expect: int = 0,
                 cache_bytes: int = DEFAULT_CACHE) -> None:
        self.path, self.vault_id = path, vault_id
        self._expect, self._cache_bytes = expect, cache_bytes
        self._filter_path = path.with_name(path.name + ".filter")
        # One connection, used from the event loop and from the threads that load index
        # objects (``Vault.load_index``): one statement or transaction at a time.
        self._lock = threading.Lock()
        self._closed = False
        #: why an existing file was thrown away at open (None if it was used or new)
        self.discarded: str | None = None
        self._db = self._connect()
        try:
            self._load()
        except sqlite3.DatabaseError as e:  # damage that opening the file did not show
            self._db.close()
            self.discarded = str(e)
            self._unlink()
            self._db = self._connect()
            self._load()

    def _load(self) -> None:
        self._objects = {name for (name,) in self._db.execute("SELECT name FROM objects")}
        self._pack_n: dict[str, int] = {}
        self._pack_ids: dict[int, str] = {}
        for n, pid in self._db.execute("SELECT n, id FROM packs"):
            self._pack_ids[n] = name = pid.hex()
            self._pack_n[name] = n
        self._next_pack = max(self._pack_ids, default=0) + 1
        self._count: int | None = None
        self._pending = bool(self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM staging)").fetchone()[0])
        token = dict(self._db.execute("SELECT k, v FROM meta")).get("filter", "")
        try:
            bloom = BloomFilter.load(self._filter_path, bytes.fromhex(token)) if token else None
        except ValueError:
            bloom = None
        if token:  # from now on the saved filter may go stale
            self._db.execute("DELETE FROM meta WHERE k = 'filter'")
        self._bloom = bloom if bloom is not None else self._scan_filter()

    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], vault_id: str, *, expect: int = 0,
             cache_bytes: int = DEFAULT_CACHE) -> DiskIndex:
        """The index of vault ``vault_id`` in ``index_dir`` (created if need be), as it
        was left; ``expect``: about how many blocks the vault holds (sizes the filter)."""
        d = Path(index_dir)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VaultError(f"cannot create the index directory {str(d)!r}: "
                             f"{e.strerror or e}; set another index directory") from None
        return cls(d / f"{vault_id}.index.sqlite", vault_id, expect=expect,
                   cache_bytes=cache_bytes)

    # -- the file ------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        for _ in range(2):
            db: sqlite3.Connection | None = None
            try:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(f"PRAGMA journal_size_limit={64 << 20}")  # the WAL, once checkpointed
                db.execute(f"PRAGMA cache_size=-{max(self._cache_bytes >> 10, 1024)}")
                db.executescript(_SCHEMA)
                meta = dict(db.execute("SELECT k, v FROM meta"))
                if not meta:
                    db.executemany("INSERT INTO meta VALUES (?, ?)",
                                   [("vault", self.vault_id), ("version", VERSION)])
                elif meta.get("vault") != self.vault_id:
                    raise _Unusable("it is the index of another vault")
                elif meta.get("version") != VERSION:
                    raise _Unusable(f"its layout {meta.get('version')!r} is not {VERSION}")
                return db
            except (sqlite3.DatabaseError, _Unusable) as e:
                if db is not None:
                    db.close()
                self.discarded = str(e)
                self._unlink()
            except OSError as e:
                raise VaultError(f"cannot open the block index {str(self.path)!r}: {e}; "
                                 "set another index directory") from None
        raise VaultError(f"cannot create the block index {str(self.path)!r}: "
                         f"{self.discarded}; delete it or set another index directory")

    def _unlink(self) -> None:
        for p in (self.path, self.path.with_name(self.path.name + "-wal"),
                  self.path.with_name(self.path.name + "-shm"), self._filter_path):
            p.unlink(missing_ok=True)

    def _settle(self) -> None:
        """Move the staged entries into ``blocks`` (callers hold the lock, or are
        __init__): a later entry of a block replaces an earlier one, as in a dict."""
        if not self._pending:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute("INSERT OR REPLACE INTO blocks SELECT id, pack, off, len FROM staging "
                       "ORDER BY id, rowid")
            db.execute("DELETE FROM staging")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._pending = False

    def _scan_filter(self) -> BloomFilter:
        # Callers hold the lock (or are __init__).
        self._settle()
        (count,) = self._db.execute("SELECT count(*) FROM blocks").fetchone()
        bloom = BloomFilter(max(2 * count, self._expect))
        bloom.update(bid for (bid,) in self._db.execute("SELECT id FROM blocks"))
        return bloom

    # -- BlockIndex ----------------------------------------------------------------------
    @property
    def objects(self) -> AbstractSet[str]:
        return self._objects

    @property
    def packs(self) -> AbstractSet[str]:
        return self._pack_n.keys()

    @property
    def entries(self) -> Mapping[bytes, Location]:
        return _Entries(self)

    def get(self, block_id: bytes) -> Location | None:
        if block_id not in self._bloom:
            return None
        with self._lock:
            self._settle()
            row = self._db.execute("SELECT pack, off, len FROM blocks WHERE id = ?",
                                   (block_id,)).fetchone()
        return None if row is None else Location(self._pack_ids[row[0]], row[1], row[2])

    def lookup(self, block_ids: Iterable[bytes]) -> dict[bytes, Location]:
        bloom, pack_ids = self._bloom, self._pack_ids
        ids = sorted({b for b in block_ids if b in bloom})
        out: dict[bytes, Location] = {}
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            q = ("SELECT id, pack, off, len FROM blocks WHERE id IN ("
                 + ",".join("?" * len(chunk)) + ")")
            with self._lock:
                self._settle()
                rows = self._db.execute(q, chunk).fetchall()
            for bid, n, off, ln in rows:
                out[bid] = Location(pack_ids[n], off, ln)
        return out

    def add_pack(self, pack_id: str, pack_entries: list[PackEntry]) -> None:
        self._add(None, {pack_id: pack_entries})

    def add_object(self, name: str, packs: dict[str, list[PackEntry]]) -> None:
        self._add(name, packs)

    def _add(self, name: str | None, packs: dict[str, list[PackEntry]]) -> None:
        new_packs: dict[str, int] = {}
        latest: dict[bytes, tuple[bytes, int, int, int]] = {}  # the last entry of a block wins
        nxt = self._next_pack
        for pack_id, entries in packs.items():
            n = self._pack_n.get(pack_id) or new_packs.get(pack_id)
            if n is None:
                n = new_packs[pack_id] = nxt
                nxt += 1
            for e in entries:
                latest[e.block_id] = (e.block_id, n, e.offset, e.length)
        rows = list(latest.values())
        db = self._db
        with self._lock:
            db.execute("BEGIN")
            try:
                db.executemany("INSERT INTO packs VALUES (?, ?)",
                               [(n, bytes.fromhex(p)) for p, n in new_packs.items()])
                db.executemany("INSERT INTO staging VALUES (?, ?, ?, ?)", rows)
                if name is not None:
                    db.execute("INSERT OR IGNORE INTO objects VALUES (?)", (name,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._next_pack = nxt
            for p, n in new_packs.items():
                self._pack_n[p] = n
                self._pack_ids[n] = p
            if name is not None:
                self._objects.add(name)
            self._count = None
            self._pending = True
            self._bloom.update(latest)
            if self._bloom.count > 2 * self._bloom.capacity:
                self._bloom = self._scan_filter()  # outgrown: more false positives than meant

    def settle(self) -> None:
        with self._lock:
            self._settle()

    def scan(self, *, by_pack: bool = False) -> Iterator[tuple[bytes, Location]]:
        """Every entry, in block-id order (the table's own), or ``by_pack`` in pack order
        and by offset within a pack (SQLite sorts it, spilling to temporary files past its
        cache). A cursor of its own: other statements may run between the rows."""
        with self._lock:
            self._settle()
        order = "pack, off" if by_pack else "id"
        pack_ids = self._pack_ids
        cur = self._db.cursor()
        for bid, n, off, ln in cur.execute(
                f"SELECT id, pack, off, len FROM blocks ORDER BY {order}"):
            yield bid, Location(pack_ids[n], off, ln)

    def replace_objects(self, objects: list[str], packs: dict[str, list[PackEntry]],
                        drop_packs: AbstractSet[str]) -> None:
        """After a prune: the index objects are now ``objects`` (the old ones are gone),
        every entry located in a pack of ``drop_packs`` is deleted, and the entries of
        ``packs`` (new packs) are added; one transaction, so a kill leaves the index as it
        was (stale: the next refresh rebuilds it) or as it is meant to be, never half."""
        new_packs: dict[str, int] = {}
        nxt = self._next_pack
        for pack_id in packs:
            if pack_id not in self._pack_n:
                new_packs[pack_id] = nxt
                nxt += 1
        numbers = {**self._pack_n, **new_packs}
        rows = [(e.block_id, numbers[p], e.offset, e.length)
                for p, entries in packs.items() for e in entries]
        gone = [(self._pack_n[p],) for p in drop_packs if p in self._pack_n]
        db = self._db
        with self._lock:
            self._settle()
            db.execute("BEGIN")
            try:
                if gone:  # one pass over the table (it is keyed by block id, not pack)
                    db.execute("CREATE TEMP TABLE IF NOT EXISTS dropped "
                               "(n INTEGER PRIMARY KEY)")
                    db.execute("DELETE FROM dropped")
                    db.executemany("INSERT OR IGNORE INTO dropped VALUES (?)", gone)
                    db.execute("DELETE FROM blocks WHERE pack IN (SELECT n FROM dropped)")
                    db.execute("DELETE FROM packs WHERE n IN (SELECT n FROM dropped)")
                db.executemany("INSERT INTO packs VALUES (?, ?)",
                               [(n, bytes.fromhex(p)) for p, n in new_packs.items()])
                db.executemany("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?)", rows)
                db.execute("DELETE FROM objects")
                db.executemany("INSERT INTO objects VALUES (?)", [(o,) for o in objects])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._next_pack = nxt
            for (n,) in gone:
                del self._pack_n[self._pack_ids.pop(n)]
            for p, n in new_packs.items():
                self._pack_n[p] = n
                self._pack_ids[n] = p
            self._objects = set(objects)
            self._count = None
            self._bloom.update(r[0] for r in rows)  # dropped ids stay: false positives only

    def fresh(self) -> DiskIndex:
        with self._lock:  # after the statement a thread may be running
            self._closed = True
            self._db.close()
            self._unlink()
        return DiskIndex(self.path, self.vault_id, expect=max(self._expect, self._bloom.count),
                         cache_bytes=self._cache_bytes)

    def close(self) -> None:
        """Save the filter (so the next open need not scan the ids) and close the file."""
        with self._lock:  # after the statement a thread may be running
            if self._closed:
                return
            self._closed = True
            try:
                token = secrets.token_bytes(16)
                self._bloom.save(self._filter_path, token)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('filter', ?)",
                                 (token.hex(),))
            except (OSError, sqlite3.Error):
                pass  # the next open scans the ids instead
            finally:
                self._db.close()

    def __contains__(self, block_id: object) -> bool:
        if not isinstance(block_id, bytes) or block_id not in self._bloom:
            return False
        with self._lock:
            self._settle()
            return self._db.execute("SELECT 1 FROM blocks WHERE id = ?",
                                    (block_id,)).fetchone() is not None

    def __len__(self) -> int:
        if self._count is None:
            with self._lock:
                self._settle()
                (self._count,) = self._db.execute("SELECT count(*) FROM blocks").fetchone()
        return self._count


class _Entries(Mapping[bytes, Location]):
    """``DiskIndex.entries``: a read-only view; iterating it reads the whole table."""

    def __init__(self, index: DiskIndex) -> None:
        self._index = index

    def __getitem__(self, block_id: bytes) -> Location:
        loc = self._index.get(block_id)
        if loc is None:
            raise KeyError(block_id)
        return loc

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._index

    def __iter__(self) -> Iterator[bytes]:
        # A cursor of its own: other statements may run between the rows it yields.
        with self._index._lock:
            self._index._settle()
        cur = self._index._db.cursor()
        for (bid,) in cur.execute("SELECT id FROM blocks"):
            yield bid

    def __len__(self) -> int:
        return len(self._index)
