"""Alembic environment: run with a connection handed over by ``procserver.db``."""

from __future__ import annotations

from alembic import context

from procserver.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only 'alembic' on the command line
    raise RuntimeError("run migrations through procserver.db.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
