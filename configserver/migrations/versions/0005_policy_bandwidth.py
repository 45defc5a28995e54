"""policy bandwidth: the agents' send limit (work and off hours) a policy carries

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: the policy sets no limit, each agent keeps its own mobility.toml one.
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("send_limit", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.drop_column("send_limit")
