"""Recovery plans in the catalog (``configserver/plans.py``): the plans, and the
operators' confirmations of their manual actions.

Imported by ``configserver/models.py`` so that the tables are on its ``Base``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from configserver.modelbase import Base


class RecoveryPlan(Base):
    """A recovery plan: ordered groups of replicated items, each group with its optional
    scripts and manual actions (the JSON documents ``plans.group_doc`` describes)."""

    __tablename__ = "recovery_plans"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    groups: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class PlanConfirmation(Base):
    """An operator's confirmation of a manual action a plan job waits at (``jobs resume``);
    the waiting step goes on once its row exists."""

    __tablename__ = "plan_confirmations"
    job: Mapped[str] = mapped_column(String(36), primary_key=True)
    step: Mapped[str] = mapped_column(String(64), primary_key=True)
    confirmed: Mapped[float] = mapped_column(Float)
    notes: Mapped[str] = mapped_column(Text, default="")
