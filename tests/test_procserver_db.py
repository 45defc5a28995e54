"""The process server's bookkeeping schema: Alembic migrations and the models agree, and a
database created before the migrations existed is upgraded in place."""

from __future__ import annotations

import sqlite3
import tomllib
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from setuptools.discovery import PEP420PackageFinder  # type: ignore[import-untyped]
from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from procserver import db
from procserver.models import SCHEMA_VERSION, Base

# Exactly what the release before the migrations created with ``create_all`` (read from
# its database with ``SELECT sql FROM sqlite_master``).
OLD_SCHEMA = [
    """CREATE TABLE cycles (seq INTEGER NOT NULL, id VARCHAR(64) NOT NULL, machine
       VARCHAR(255) NOT NULL, state VARCHAR(16) NOT NULL, "full" BOOLEAN NOT NULL, base
       VARCHAR(64), begin_doc TEXT NOT NULL, end_doc TEXT, point_id VARCHAR(64), created
       FLOAT NOT NULL, PRIMARY KEY (seq), UNIQUE (id))""",
    "CREATE INDEX ix_cycles_machine ON cycles (machine)",
    "CREATE INDEX ix_cycles_state ON cycles (state)",
    """CREATE TABLE point_reports (point_id VARCHAR(64) NOT NULL, machine VARCHAR(255) NOT
       NULL, doc TEXT NOT NULL, reported BOOLEAN NOT NULL, PRIMARY KEY (point_id))""",
    "CREATE INDEX ix_point_reports_reported ON point_reports (reported)",
    """CREATE TABLE forgotten_points (point_id VARCHAR(64) NOT NULL, machine VARCHAR(255) NOT
       NULL, PRIMARY KEY (point_id))""",
    """CREATE TABLE segments (id INTEGER NOT NULL, cycle_seq INTEGER NOT NULL, seq INTEGER NOT
       NULL, path TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (id), FOREIGN
       KEY(cycle_seq) REFERENCES cycles (seq))""",
    "CREATE INDEX ix_segments_cycle_seq ON segments (cycle_seq)",
    """CREATE TABLE receive_progress (cycle_seq INTEGER NOT NULL, frames INTEGER NOT NULL,
       last_disk INTEGER, last_block INTEGER, next_segment INTEGER NOT NULL, PRIMARY KEY
       (cycle_seq), FOREIGN KEY(cycle_seq) REFERENCES cycles (seq))""",
]


def _diff(conn: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


async def _version(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        return str((await conn.execute(text("SELECT version_num FROM alembic_version"))
                    ).scalar_one())


async def test_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    engine, _ = await db.open_db(str(tmp_path / "procserver.db"))
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        assert await _version(engine) == SCHEMA_VERSION
    finally:
        await engine.dispose()
    engine, _ = await db.open_db(str(tmp_path / "procserver.db"))  # a second start: no-op
    try:
        assert await _version(engine) == SCHEMA_VERSION
    finally:
        await engine.dispose()


async def test_a_database_from_before_migrations_is_stamped_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "procserver.db"
    with sqlite3.connect(path) as c:
        for stmt in OLD_SCHEMA:
            c.execute(stmt)
        c.execute("INSERT INTO cycles VALUES (1, 'c1', 'web01', 'complete', 1, NULL, '{}', "
                  "'{}', NULL, 1.0)")
        c.execute("INSERT INTO segments VALUES (1, 1, 0, '/x/00000000.hrl', 10)")
    engine, sm = await db.open_db(str(path))
    try:
        async with sm() as s:
            row = (await s.execute(select(db.Cycle))).scalar_one()
            assert (row.id, row.state) == ("c1", db.COMPLETE)
            assert [seg.size for seg in (await s.execute(select(db.Segment))).scalars()] == [10]
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert await _version(engine) == SCHEMA_VERSION
    finally:
        await engine.dispose()


def test_the_migrations_ship_with_the_package() -> None:
    versions = sorted(p.name for p in (db.MIGRATIONS / "versions").glob("*.py"))
    assert versions and versions[0].startswith("0001_")
    assert (db.MIGRATIONS / "env.py").is_file()
    # pyproject's package discovery (namespaces on, as setuptools does for pyproject.toml)
    # takes the migrations and their versions folder into the distribution.
    root = db.MIGRATIONS.parents[1]
    find = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]
    found = PEP420PackageFinder.find(str(root), include=find["include"])
    assert {"procserver.migrations", "procserver.migrations.versions"} <= set(found)
