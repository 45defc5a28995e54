"""procserver storage: since when a process server's uploads to the vault fail, and why

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: its uploads are not failing (or it is too old to say).
    with op.batch_alter_table("process_servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("storage_failing_since", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("storage_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("process_servers", schema=None) as batch_op:
        batch_op.drop_column("storage_error")
        batch_op.drop_column("storage_failing_since")
