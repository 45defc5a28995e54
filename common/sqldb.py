"""Opening a daemon's SQL database: SQLAlchemy 2 async engine, schema by Alembic.

Both servers keep their state this way (the configuration server's catalog, the
process server's HRL bookkeeping); each passes its own migrations folder and the
table that tells a database made before its migrations existed. SQLite runs in WAL
mode with ``synchronous=FULL`` (a commit is on disk when it returns), a busy timeout of
``WRITE_WAIT`` seconds, and the process's write transactions queued one at a time
(``common.sqlwrite``); PostgreSQL through asyncpg with a small pool. Only the servers
import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import Connection, MetaData, event, inspect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from common.sqlwrite import serialize_writes

# Seconds a write waits for its turn (the gate) and for SQLite's lock (the busy timeout)
# before it fails with "database is locked". The driver's default of 5 s was passed by
# writers queued behind commits slowed by a busy disk.
WRITE_WAIT = 60.0


def run_env(metadata: MetaData, owner: str) -> None:
    """The body of a migrations folder's ``env.py``: run the migrations on the connection
    ``migrate`` handed over (``owner`` names the module whose ``migrate()`` does that)."""
    connection = context.config.attributes.get("connection")
    if connection is None:  # pragma: no cover - only 'alembic' on the command line
        raise RuntimeError(f"run migrations through {owner}.migrate()")
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def alembic_config(migrations: Path, connection: Connection | None = None) -> Config:
    """An Alembic config for ``migrations``; ``env.py`` finds ``connection`` in
    ``config.attributes``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations))
    cfg.attributes["connection"] = connection
    return cfg


async def migrate(engine: AsyncEngine, migrations: Path, legacy_table: str) -> None:
    """Bring the database to the newest revision. A database that holds
    ``legacy_table`` but no ``alembic_version`` was made before the migrations, with
    exactly revision 0001's schema: it is stamped 0001 in place first."""
    def upgrade(conn: Connection) -> None:
        tables = set(inspect(conn).get_table_names())
        cfg = alembic_config(migrations, conn)
        if "alembic_version" not in tables and legacy_table in tables:
            command.stamp(cfg, "0001")
        command.upgrade(cfg, "head")

    async with engine.begin() as conn:
        await conn.run_sync(upgrade)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": WRITE_WAIT})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        serialize_writes(engine, WRITE_WAIT)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


async def open_db(url: str, migrations: Path, legacy_table: str
                  ) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """Open (creating or upgrading) the database at ``url``."""
    engine = make_engine(url)
    try:
        await migrate(engine, migrations, legacy_table)
    except BaseException:
        await engine.dispose()
        raise
    return engine, async_sessionmaker(engine, expire_on_commit=False)
