"""The catalog's schema: Alembic migrations and the models agree, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from configserver import db
from configserver.models import Base

VERSIONS = Path(db.__file__).parent / "migrations" / "versions"


def _diff(conn: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


async def test_migrations_build_exactly_the_models(catalog_url: str) -> None:
    engine, _ = await db.open_db(catalog_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))
                       ).scalar_one()
        assert version == max(p.name[:4] for p in VERSIONS.glob("[0-9]*.py"))  # the newest
    finally:
        await engine.dispose()
    engine, _ = await db.open_db(catalog_url)  # a second start migrates nothing
    await engine.dispose()


async def test_a_catalog_from_before_migrations_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as c:  # the schema the first release created with create_all
        c.execute("CREATE TABLE recovery_points (id VARCHAR(64) PRIMARY KEY, machine "
                  "VARCHAR(255) NOT NULL, created VARCHAR(40) NOT NULL, consistency VARCHAR(16) "
                  "NOT NULL, doc TEXT NOT NULL, received FLOAT NOT NULL)")
        c.execute("INSERT INTO recovery_points VALUES ('p1', 'web01', '2026', 'crash', '{}', 1)")
    engine, sm = await db.open_db(f"sqlite+aiosqlite:///{path}")
    try:
        async with sm() as s:
            assert (await s.get(db.RecoveryPoint, "p1")) is not None
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert {"jobs", "policies", "machines", "replicated_items"} <= tables
    finally:
        await engine.dispose()
