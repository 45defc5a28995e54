"""Every table of the process server's HRL bookkeeping (SQLite, SQLAlchemy 2).

A cycle is one agent replication cycle: ``receiving`` while frames arrive,
``complete`` once every segment is fsynced and the agent was acked, ``uploaded``
once its recovery point is whole in the vault, ``aborted`` if the agent went
away before the end (nothing of it was acknowledged).

The schema is owned by the Alembic migrations in ``procserver/migrations``
(``db.open_db`` upgrades to ``SCHEMA_VERSION`` at every start); these models and
the migrations must agree (``tests/test_procserver_db.py`` checks it).
"""

from __future__ import annotations

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The newest Alembic revision: the schema these models describe.
SCHEMA_VERSION = "0002"

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
    """A sealed (fsynced) HRL segment file of a cycle, not yet consumed by the uploader."""

    __tablename__ = "segments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cycle_seq: Mapped[int] = mapped_column(ForeignKey("cycles.seq"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)


class PointReport(Base):
    """Outbox: points uploaded here, marked reported once the catalog accepted them."""

    __tablename__ = "point_reports"
    point_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    machine: Mapped[str] = mapped_column(String(255))
    doc: Mapped[str] = mapped_column(Text)
    reported: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class ReceiveProgress(Base):
    """The durable part of a resumable cycle still being received (one row per cycle).

    Updated in the same transaction as each segment's row: ``frames`` and the highest
    ``(last_disk, last_block)`` among them are exactly what the recorded segments hold.
    """

    __tablename__ = "receive_progress"
    cycle_seq: Mapped[int] = mapped_column(ForeignKey("cycles.seq"), primary_key=True)
    frames: Mapped[int] = mapped_column(Integer, default=0)
    last_disk: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_block: Mapped[int | None] = mapped_column(Integer, nullable=True)
    next_segment: Mapped[int] = mapped_column(Integer, default=0)


class ForgottenPoint(Base):
    """Outbox: points retention forgot in the vault that the catalog still has to drop."""

    __tablename__ = "forgotten_points"
    point_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    machine: Mapped[str] = mapped_column(String(255))


class OpenGroupPoint(Base):
    """A consistency group's barrier open here (``procserver/barrier.py``): a row from its
    first arrival until its outcome is in the outbox; one left at a start was open when
    the process server stopped, and fails."""

    __tablename__ = "open_group_points"
    point_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(255))
    members: Mapped[str] = mapped_column(Text)  # JSON list of machine names
    opened: Mapped[float] = mapped_column(Float)


class GroupPointReport(Base):
    """Outbox: group point outcomes not yet accepted by the catalog (the row goes then)."""

    __tablename__ = "group_point_reports"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    point_id: Mapped[str] = mapped_column(String(64), index=True)
    doc: Mapped[str] = mapped_column(Text)
