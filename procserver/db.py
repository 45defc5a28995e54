"""The process server's HRL bookkeeping store: SQLite (WAL, ``synchronous=FULL``),
SQLAlchemy 2 async, schema by Alembic.

The tables are in ``procserver.models`` (re-exported here). At every start the
database is upgraded to the newest revision; a database created before the
migrations existed (by ``create_all``: it has ``cycles`` but no ``alembic_version``)
holds exactly revision 0001's schema and is stamped 0001 in place first.
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

from procserver.models import (
    ABORTED,
    COMPLETE,
    RECEIVING,
    SCHEMA_VERSION,
    UPLOADED,
    Base,
    Cycle,
    ForgottenPoint,
    PointReport,
    ReceiveProgress,
    Segment,
)

__all__ = ["ABORTED", "COMPLETE", "RECEIVING", "SCHEMA_VERSION", "UPLOADED", "Base", "Cycle",
           "ForgottenPoint", "PointReport", "ReceiveProgress", "Segment", "migrate", "open_db"]

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(conn: Connection) -> None:
    tables = set(inspect(conn).get_table_names())
    cfg = alembic_config(conn)
    if "alembic_version" not in tables and "cycles" in tables:
        command.stamp(cfg, "0001")  # made by create_all before the migrations existed
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the database to the newest revision (``SCHEMA_VERSION``)."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(path: str) -> AsyncEngine:
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


async def open_db(path: str) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """Open (creating or upgrading) the database file at ``path``."""
    engine = make_engine(path)
    try:
        await migrate(engine)
    except BaseException:
        await engine.dispose()
        raise
    return engine, async_sessionmaker(engine, expire_on_commit=False)
