"""Alembic environment: run with a connection handed over by ``configserver.db``."""

from __future__ import annotations

from common.sqldb import run_env
from configserver.models import Base

run_env(Base.metadata, "configserver.db")
