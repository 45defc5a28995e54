"""consistency groups: the groups, their members, and their group points

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consistency_groups",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("barrier_timeout_s", sa.Integer(), nullable=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "group_members",
        sa.Column("machine", sa.String(length=63), nullable=False),
        sa.Column("group_name", sa.String(length=63), nullable=False),
        sa.PrimaryKeyConstraint("machine"),
    )
    op.create_index("ix_group_members_group_name", "group_members", ["group_name"])
    op.create_table(
        "group_points",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("group_name", sa.String(length=63), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("finished", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_group_points_group_name", "group_points", ["group_name"])


def downgrade() -> None:
    op.drop_index("ix_group_points_group_name", table_name="group_points")
    op.drop_table("group_points")
    op.drop_index("ix_group_members_group_name", table_name="group_members")
    op.drop_table("group_members")
    op.drop_table("consistency_groups")
