"""Leadership of the job engine on a shared PostgreSQL catalog.

Several configuration servers may share one PostgreSQL catalog; only one runs the jobs:
the one holding a session-level advisory lock on a connection it keeps open. The others
wait as standbys and take over when that connection goes (its server stopped or died).
On SQLite there is one server per catalog: it always leads.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = structlog.get_logger("configserver.jobs")

PG_LEADER_KEY = 0x5352_4A42  # "SRJB": the job engine's leader lock on PostgreSQL


async def lead(database: AsyncEngine, poll_seconds: float) -> AsyncConnection | None:
    """Return once this server leads: the connection holding the lock (None on SQLite,
    which needs none). Polls every ``poll_seconds`` while another server leads."""
    if database.dialect.name != "postgresql":
        return None
    announced = False
    while True:
        conn = await database.connect()
        try:
            if await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"),
                                 {"k": PG_LEADER_KEY}):
                await conn.commit()
                log.info("job_engine_leading")
                return conn
            await conn.rollback()
        except BaseException:
            await conn.close()
            raise
        await conn.close()
        if not announced:
            log.info("job_engine_standby", hint="another configuration server on this "
                     "catalog runs the jobs; this one takes over if it stops")
            announced = True
        await asyncio.sleep(poll_seconds)  # poll for the leader's departure


async def holds_lock(conn: AsyncConnection, timeout: float = 15.0) -> bool:
    """Whether ``conn`` still holds the leader lock: its session is alive and the lock is
    among its locks (a connection cut by the network or by pg_terminate_backend is not)."""
    try:
        async with asyncio.timeout(timeout):
            held = await conn.scalar(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid = pg_backend_pid() AND granted "
                "AND ((classid::bigint << 32) | objid::bigint) = :k"), {"k": PG_LEADER_KEY})
            await conn.rollback()
    except Exception as e:  # any failure to ask is a lost session
        log.warning("job_engine_lock_check_failed", error=str(e) or type(e).__name__)
        return False
    return bool(held)


async def resign(conn: AsyncConnection | None) -> None:
    """Hand leadership over at once: unlock, and never return the session to the pool."""
    if conn is None:
        return
    with contextlib.suppress(Exception):
        await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LEADER_KEY})
    await conn.invalidate()
    await conn.close()
