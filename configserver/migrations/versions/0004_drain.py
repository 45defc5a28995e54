"""drain: what each process server still holds per machine, and its heartbeat count

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("process_servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pending_cycles", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("heartbeats", sa.BigInteger(), nullable=False,
                                      server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("process_servers", schema=None) as batch_op:
        batch_op.drop_column("heartbeats")
        batch_op.drop_column("pending_cycles")
