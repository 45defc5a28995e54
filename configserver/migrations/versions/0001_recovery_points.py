"""The recovery-point catalog (the schema before migrations existed).

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recovery_points",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("machine", sa.String(length=255), nullable=False),
        sa.Column("created", sa.String(length=40), nullable=False),
        sa.Column("consistency", sa.String(length=16), nullable=False),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.Column("received", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_recovery_points_machine", "recovery_points", ["machine"])
    op.create_index("ix_recovery_points_created", "recovery_points", ["created"])


def downgrade() -> None:
    op.drop_table("recovery_points")
