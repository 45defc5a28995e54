"""failover: recovery settings, the last drill and the failover on replicated items

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("replicated_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recovery", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("last_drill", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("failover", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replicated_items", schema=None) as batch_op:
        batch_op.drop_column("failover")
        batch_op.drop_column("last_drill")
        batch_op.drop_column("recovery")
