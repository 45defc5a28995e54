"""One write transaction at a time per SQLite database in a process, in arrival order.

SQLite lets one connection write at a time; the others wait in SQLite's busy handler,
which polls (sleeps of up to 100 ms) and gives up with ``database is locked`` once the
busy timeout has passed. Under a burst of writers (every agent's session recording its
segments, the uploader, the reporter) whose commits wait on slow ``fsync`` calls (the
cache being filled by initial copies), that polling is neither fair nor bounded: a
writer that loses the race a few dozen times fails although the database is fine.

So the server's own writers queue here instead, on the event loop: a transaction takes
the gate before its first ``INSERT``/``UPDATE``/``DELETE``/``REPLACE`` (the statement
before which the driver opens the transaction), or before a ``SELECT … FOR UPDATE``
(``with_for_update``: SQLite has no row locks and SQLAlchemy leaves the clause out, so
without the gate two read-modify-writes of one row would both read the old value and the
later commit would silently undo the earlier one), and lets go when it commits or rolls
back. At most one writer of the process is then inside SQLite's lock at a time (the
next one may start while the previous commit finishes: its first write waits in SQLite
for it, and sees it), and the busy timeout only covers that overlap and other
processes. A read for update also waits for the commits under way to return: a plain
select would not wait, and would read the row as it was. Plain reads never take the
gate (WAL: they do not wait for writers).

A task that asks for the gate while it already holds it on another connection would
wait for itself: that is refused at once (``SelfDeadlockError``). A wait longer than the
gate's ``wait`` seconds fails with ``database is locked`` as SQLite would.
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only

_HOLDS = "sqlwrite_holds_gate"  # key in a pooled connection's ``info``
_COMMITTED = "sqlwrite_committed"  # its commit is under way (``WriteGate.committing``)
_WRITES = ("insert", "update", "delete", "replace")


class SelfDeadlockError(RuntimeError):
    """A task began a second write transaction while its first one is still open."""


class WriteGate:
    """The queue of one database's write transactions in this process."""

    def __init__(self, wait: float) -> None:
        self.wait = wait  # seconds a writer waits for its turn before it fails
        self._lock = asyncio.Lock()
        self.holder: asyncio.Task[Any] | None = None
        self.waiting = 0  # writers waiting for their turn now
        self._loop: asyncio.AbstractEventLoop | None = None  # the holder's
        # Commits under way (let go of the gate, the driver's commit not yet returned):
        # a read for update waits for them, a plain write need not.
        self.committing = 0
        self._settled = asyncio.Event()
        self._settled.set()

    def acquire(self) -> None:
        """Take the gate (called in the driver's greenlet: waits on the event loop)."""
        task = asyncio.current_task()
        if task is not None and task is self.holder:
            raise SelfDeadlockError(
                "this task began a write transaction while its own earlier one is still "
                "open on another connection: it would wait for itself; commit or roll "
                "back the first one before writing through another session")
        await_only(self._take())
        self.holder = task
        self._loop = asyncio.get_running_loop()

    def acquire_settled(self) -> None:
        """Take the gate, then wait for the commits under way to return (a read for
        update must see them)."""
        self.acquire()
        if not self._settled.is_set():
            try:
                await_only(self._until_settled())
            except BaseException:
                self.release()
                raise

    async def _until_settled(self) -> None:
        try:
            async with asyncio.timeout(self.wait):
                await self._settled.wait()
        except TimeoutError:
            raise sqlite3.OperationalError(
                f"database is locked: a commit did not return within {self.wait:g} s"
            ) from None

    def commit_started(self) -> None:
        """A holder's commit begins: the gate is given back now (the next writer's
        statements wait in SQLite for the commit); reads for update wait for its end."""
        self.committing += 1
        self._settled.clear()
        self.release()

    def commit_returned(self) -> None:
        """A commit ``commit_started`` announced has returned (from any thread)."""
        self._on_loop(self._commit_returned)

    def _commit_returned(self) -> None:
        self.committing = max(0, self.committing - 1)
        if self.committing == 0:
            self._settled.set()

    async def _take(self) -> None:
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait):
                await self._lock.acquire()
        except TimeoutError:
            raise sqlite3.OperationalError(
                f"database is locked: no write transaction could start within "
                f"{self.wait:g} s (another one of this process held it all that time)"
            ) from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        """Give the gate back; from another thread (a leaked connection collected there)
        through the holder's event loop."""
        self._on_loop(self._release)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is not None and here is not loop:
            if not loop.is_closed():
                loop.call_soon_threadsafe(fn)
            return
        fn()

    def _release(self) -> None:
        self.holder = None
        if self._lock.locked():
            self._lock.release()


_gates: weakref.WeakKeyDictionary[Engine, WriteGate] = weakref.WeakKeyDictionary()


def write_gate(engine: AsyncEngine) -> WriteGate | None:
    """The gate of ``engine`` (None where writes are not serialized: not SQLite)."""
    return _gates.get(engine.sync_engine)


def _is_write(statement: str) -> bool:
    return statement.lstrip().lower().startswith(_WRITES)


def _for_update(context: Any) -> bool:
    """A select asked for with ``with_for_update`` (the clause itself is not rendered for
    SQLite): the read of a read-modify-write, which must see the previous one's commit."""
    compiled = getattr(context, "compiled", None)
    return getattr(getattr(compiled, "statement", None), "_for_update_arg", None) is not None


def serialize_writes(engine: AsyncEngine, wait: float) -> WriteGate:
    """Queue the write transactions of ``engine`` (an aiosqlite engine) on one gate."""
    gate = _gates[engine.sync_engine] = WriteGate(wait)

    def before(conn: Connection, _cursor: Any, statement: str, _params: Any,
               context: Any, _many: bool) -> None:
        if conn.info.get(_HOLDS):
            return
        if _is_write(statement):
            gate.acquire()
        elif _for_update(context):
            gate.acquire_settled()
        else:
            return
        conn.info[_HOLDS] = True

    def committing(conn: Connection) -> None:
        # The event comes *before* the driver's commit: the gate goes back now (the next
        # writer's statements wait in SQLite's lock for it), but a read for update waits
        # until this commit has returned — when the connection goes back to the pool (a
        # session's commit does that) or begins its next transaction.
        if not conn.invalidated and not conn.closed and conn.info.pop(_HOLDS, False):
            conn.info[_COMMITTED] = True
            gate.commit_started()

    def begun(conn: Connection) -> None:
        if conn.info.pop(_COMMITTED, False):
            gate.commit_returned()

    def rolled_back(conn: Connection) -> None:
        # Nothing of it will be seen: the gate may go back at once. An invalidated
        # connection (a query cancelled mid-way) cannot show its ``info`` (it raises):
        # the pool's invalidate event below gives the gate back instead.
        if not conn.invalidated and not conn.closed and conn.info.pop(_HOLDS, False):
            gate.release()

    def given_back(record: Any) -> None:
        # A connection returned or dropped: after a commit, or without one.
        if record is None:
            return
        if record.info.pop(_COMMITTED, False):
            gate.commit_returned()
        if record.info.pop(_HOLDS, False):
            gate.release()

    def reset(dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
        given_back(connection_record)

    def checkin(dbapi_connection: Any, connection_record: Any) -> None:
        given_back(connection_record)

    def invalidate(dbapi_connection: Any, connection_record: Any, exception: Any) -> None:
        given_back(connection_record)

    sync = engine.sync_engine
    event.listen(sync, "before_cursor_execute", before)
    event.listen(sync, "commit", committing)
    event.listen(sync, "begin", begun)
    event.listen(sync, "rollback", rolled_back)
    event.listen(sync.pool, "reset", reset)
    event.listen(sync.pool, "checkin", checkin)
    event.listen(sync.pool, "invalidate", invalidate)
    return gate
