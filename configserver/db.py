"""The configuration server's catalog (SQLAlchemy 2, async; SQLite by default)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, String, Text, event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class RecoveryPoint(Base):
    __tablename__ = "recovery_points"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    machine: Mapped[str] = mapped_column(String(255), index=True)
    created: Mapped[str] = mapped_column(String(40), index=True)
    consistency: Mapped[str] = mapped_column(String(16))
    doc: Mapped[str] = mapped_column(Text)
    received: Mapped[float] = mapped_column(Float)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


async def open_db(url: str) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(url)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    return engine, async_sessionmaker(engine, expire_on_commit=False)
