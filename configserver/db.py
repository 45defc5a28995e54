"""The configuration server's catalog store: SQLAlchemy 2 async engine + Alembic.

SQLite by default (WAL, ``synchronous=FULL``); PostgreSQL (asyncpg) when the URL
says ``postgresql+asyncpg://``. The schema is brought to the newest Alembic
revision at every start; a catalog created before Alembic (it holds only
``recovery_points``) is stamped at revision 0001 first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, inspect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from configserver.models import (
    Account,
    Base,
    Certificate,
    Event,
    Job,
    Machine,
    Policy,
    ProcessServer,
    RecoveryPoint,
    Registration,
    ReplicatedItem,
)

__all__ = ["Account", "Base", "Certificate", "Event", "Job", "Machine", "Policy",
           "ProcessServer", "RecoveryPoint", "Registration", "ReplicatedItem", "migrate",
           "open_db"]

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(conn: Connection) -> None:
    tables = set(inspect(conn).get_table_names())
    cfg = alembic_config(conn)
    if "alembic_version" not in tables and "recovery_points" in tables:
        command.stamp(cfg, "0001")  # a catalog from before the migrations
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


async def open_db(url: str) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    engine = make_engine(url)
    try:
        await migrate(engine)
    except BaseException:
        await engine.dispose()
        raise
    return engine, async_sessionmaker(engine, expire_on_commit=False)
