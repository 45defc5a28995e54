"""Alembic environment: run with a connection handed over by ``procserver.db``."""

from __future__ import annotations

from common.sqldb import run_env
from procserver.models import Base

run_env(Base.metadata, "procserver.db")
