"""Alembic migrations of the process server's HRL bookkeeping database."""
