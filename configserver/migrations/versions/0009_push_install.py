"""push install: machines' SSH host keys, and the install requests process servers run

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: no host key known yet (the next push install trusts the first one it sees).
    with op.batch_alter_table("machines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host_key", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("host_key_source", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("host_key_recorded", sa.Float(), nullable=True))
    op.create_table(
        "install_requests",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("machine", sa.String(length=63), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("procserver", sa.String(length=255), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("claimed", sa.Float(), nullable=True),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_index("ix_install_requests_procserver", "install_requests", ["procserver"])
    op.create_index("ix_install_requests_state", "install_requests", ["state"])


def downgrade() -> None:
    op.drop_table("install_requests")
    with op.batch_alter_table("machines", schema=None) as batch_op:
        batch_op.drop_column("host_key_recorded")
        batch_op.drop_column("host_key_source")
        batch_op.drop_column("host_key")
