"""point verification: each recovery point's last verification result

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "point_verifications",
        sa.Column("point_id", sa.String(length=64), nullable=False),
        sa.Column("machine", sa.String(length=255), nullable=False),
        sa.Column("verified", sa.Float(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("damaged", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("point_id"),
    )
    with op.batch_alter_table("point_verifications", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_point_verifications_machine"), ["machine"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("point_verifications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_point_verifications_machine"))
    op.drop_table("point_verifications")
