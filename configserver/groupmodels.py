"""Multi-VM consistency groups in the catalog (``configserver/groups.py``): the groups,
their members (a machine is in one group at most: the primary key says so) and the group
points the process servers report (``configserver/grouppoints.py``).

Imported by ``configserver/models.py`` so that the tables are on its ``Base``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from configserver.modelbase import Base


class ConsistencyGroup(Base):
    """A group of machines whose points are taken at one coordinated moment every
    ``interval_s``; a member that does not reach the barrier within ``barrier_timeout_s``
    fails that group point."""

    __tablename__ = "consistency_groups"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    barrier_timeout_s: Mapped[int] = mapped_column(Integer)
    interval_s: Mapped[int] = mapped_column(Integer)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class GroupMember(Base):
    """A machine of a group: one row per machine, so no machine is in two groups."""

    __tablename__ = "group_members"
    machine: Mapped[str] = mapped_column(String(63), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(63), index=True)


class GroupPoint(Base):
    """One coordinated moment of a group: ``released`` (every member froze at it; each
    member's cycle is in ``members``, machine -> cycle id) or ``failed`` (``error`` says
    which member did not arrive)."""

    __tablename__ = "group_points"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(63), index=True)
    created: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))  # released | failed
    members: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
