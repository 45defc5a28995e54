"""The configuration server's catalog store: SQLAlchemy 2 async engine + Alembic.

SQLite by default (WAL, ``synchronous=FULL``); PostgreSQL (asyncpg) when the URL
says ``postgresql+asyncpg://``. The schema is brought to the newest Alembic
revision at every start; a catalog created before Alembic (it holds only
``recovery_points``) is stamped at revision 0001 first.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from common import sqldb
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


async def migrate(engine: AsyncEngine) -> None:
    await sqldb.migrate(engine, MIGRATIONS, "recovery_points")


async def open_db(url: str) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    return await sqldb.open_db(url, MIGRATIONS, "recovery_points")
