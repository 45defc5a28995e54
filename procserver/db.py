"""The process server's HRL bookkeeping in SQLite (SQLAlchemy 2, async).

A cycle is one agent replication cycle: ``receiving`` while frames arrive,
``complete`` once every segment is fsynced and the agent was acked, ``uploaded``
once its recovery point is whole in the vault, ``aborted`` if the agent went
away before the end (nothing of it was acknowledged).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RECEIVING, COMPLETE, UPLOADED, ABORTED = "receiving", "complete", "uploaded", "aborted"


class Base(DeclarativeBase):
    pass


class Cycle(Base):
    __tablename__ = "cycles"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    machine: Mapped[str] = mapped_column(String(255), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    full: Mapped[bool] = mapped_column(Boolean)
    base: Mapped[str | None] = mapped_column(String(64), nullable=True)
    begin_doc: Mapped[str] = mapped_column(Text)
    end_doc: Mapped[str | None] = mapped_column(Text, nullable=True)
    point_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created: Mapped[float] = mapped_column(Float)


class Segment(Base):
    __tablename__ = "segments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cycle_seq: Mapped[int] = mapped_column(ForeignKey("cycles.seq"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)


class PointReport(Base):
    __tablename__ = "point_reports"
    point_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    machine: Mapped[str] = mapped_column(String(255))
    doc: Mapped[str] = mapped_column(Text)
    reported: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


async def open_db(path: str) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    return engine, async_sessionmaker(engine, expire_on_commit=False)
