"""The HRL bookkeeping (the schema before migrations existed).

Revision ID: 0001
Revises:
Create Date: 2026-12-05
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
        "cycles",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("machine", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("full", sa.Boolean(), nullable=False),
        sa.Column("base", sa.String(length=64), nullable=True),
        sa.Column("begin_doc", sa.Text(), nullable=False),
        sa.Column("end_doc", sa.Text(), nullable=True),
        sa.Column("point_id", sa.String(length=64), nullable=True),
        sa.Column("created", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    op.create_index("ix_cycles_machine", "cycles", ["machine"])
    op.create_index("ix_cycles_state", "cycles", ["state"])
    op.create_table(
        "segments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cycle_seq", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["cycle_seq"], ["cycles.seq"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_segments_cycle_seq", "segments", ["cycle_seq"])
    op.create_table(
        "point_reports",
        sa.Column("point_id", sa.String(length=64), nullable=False),
        sa.Column("machine", sa.String(length=255), nullable=False),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.Column("reported", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("point_id"),
    )
    op.create_index("ix_point_reports_reported", "point_reports", ["reported"])
    op.create_table(
        "receive_progress",
        sa.Column("cycle_seq", sa.Integer(), nullable=False),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("last_disk", sa.Integer(), nullable=True),
        sa.Column("last_block", sa.Integer(), nullable=True),
        sa.Column("next_segment", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["cycle_seq"], ["cycles.seq"]),
        sa.PrimaryKeyConstraint("cycle_seq"),
    )
    op.create_table(
        "forgotten_points",
        sa.Column("point_id", sa.String(length=64), nullable=False),
        sa.Column("machine", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("point_id"),
    )


def downgrade() -> None:
    for table in ("forgotten_points", "receive_progress", "point_reports", "segments",
                  "cycles"):
        op.drop_table(table)
