"""Change notifications across configuration servers sharing one PostgreSQL catalog.

Every server's ``Notifier`` wakes its own long polls, job engine, alert evaluation and
notice delivery. On a shared PostgreSQL catalog a change made through one server must
wake the others too: each server keeps one connection that LISTENs on ``CHANNEL``, and
its ``Notifier.notify()`` also sends a NOTIFY there (the payload names the server, which
ignores its own). When the connection is lost the server goes on with its local wake-ups
and periodic re-checks (what a long poll on another server then sees late is what it
saw before this existed) and reconnects with a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

import asyncpg
import structlog
from sqlalchemy.engine import URL

from common.backoff import Backoff
from configserver.core import Notifier

log = structlog.get_logger("configserver.pgnotify")

CHANNEL = "siterecovery_changed"


def asyncpg_dsn(url: URL) -> str:
    """The ``postgresql://`` DSN asyncpg takes, from the catalog's SQLAlchemy URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class PgNotifyLink:
    """The LISTEN connection of one configuration server, and its NOTIFY."""

    def __init__(self, dsn: str, notifier: Notifier) -> None:
        self.dsn, self.notifier = dsn, notifier
        self.origin = secrets.token_hex(8)  # this server, in the payload
        self.connected = asyncio.Event()
        self._conn: Any = None  # asyncpg.Connection while connected
        self._lock = asyncio.Lock()  # one query at a time on the connection
        self._failed_publish = False

    async def publish(self) -> None:
        """Tell the other servers something changed (best effort: never raises but
        ``CancelledError``). The NOTIFY itself is shielded: a caller cancelled while it is
        on the wire (a job engine stopping) must not leave the connection in the middle
        of a query, which asyncpg cannot recover from."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return
        await asyncio.shield(self._notify(conn))

    async def _notify(self, conn: Any) -> None:
        try:
            async with self._lock:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.origin)
            self._failed_publish = False
        except Exception as e:  # best effort; a connection in an unknown state is dropped
            if not self._failed_publish:  # once per outage, not per change
                log.warning("change_notify_failed", error=str(e) or type(e).__name__,
                            error_type=type(e).__name__)
            self._failed_publish = True
            if isinstance(e, asyncpg.InternalClientError):
                conn.terminate()  # run() reconnects

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload != self.origin:
            asyncio.get_running_loop().create_task(self.notifier.notify_local())

    async def run(self) -> None:
        """Keep the LISTEN connection up until cancelled."""
        backoff = Backoff(0.5, 30.0)
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.dsn, timeout=15)
            except (OSError, asyncpg.PostgresError, TimeoutError) as e:
                delay = backoff.next()
                log.warning("change_listener_unavailable", error=str(e) or type(e).__name__,
                            retry_in_seconds=round(delay, 1))
                await asyncio.sleep(delay)
                continue
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._received)
                self._conn = conn
                self.connected.set()
                backoff.reset()
                log.info("change_listener_connected")
                # Changes missed while disconnected: every waiter re-checks once.
                await self.notifier.notify_local()
                await lost.wait()
                log.warning("change_listener_lost")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("change_listener_lost", error=str(e) or type(e).__name__)
            finally:
                self._conn = None
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await conn.close(timeout=5)
            await asyncio.sleep(backoff.next())
