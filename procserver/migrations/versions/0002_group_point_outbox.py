"""The consistency groups' barriers open here and the outbox of their outcomes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "open_group_points",
        sa.Column("point_id", sa.String(length=64), nullable=False),
        sa.Column("group_name", sa.String(length=255), nullable=False),
        sa.Column("members", sa.Text(), nullable=False),
        sa.Column("opened", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("point_id"),
    )
    op.create_table(
        "group_point_reports",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("point_id", sa.String(length=64), nullable=False),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index("ix_group_point_reports_point_id", "group_point_reports", ["point_id"])


def downgrade() -> None:
    op.drop_index("ix_group_point_reports_point_id", table_name="group_point_reports")
    op.drop_table("group_point_reports")
    op.drop_table("open_group_points")
