"""The process server's HRL bookkeeping store: SQLite (WAL, ``synchronous=FULL``),
SQLAlchemy 2 async, schema by Alembic.

The tables are in ``procserver.models`` (re-exported here). At every start the
database is upgraded to the newest revision; a database created before the
migrations existed (by ``create_all``: it has ``cycles`` but no ``alembic_version``)
holds exactly revision 0001's schema and is stamped 0001 in place first.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from common import sqldb
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


async def migrate(engine: AsyncEngine) -> None:
    """Bring the database to the newest revision (``SCHEMA_VERSION``)."""
    await sqldb.migrate(engine, MIGRATIONS, "cycles")


async def open_db(path: str) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """Open (creating or upgrading) the database file at ``path``."""
    return await sqldb.open_db(f"sqlite+aiosqlite:///{path}", MIGRATIONS, "cycles")
