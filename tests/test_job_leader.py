"""Two configuration servers on one PostgreSQL catalog: one runs the jobs, the other stands
by and takes over when the first stops or loses its database connection; a change made
through either wakes the long polls of both (LISTEN/NOTIFY, configserver/pgnotify.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from configserver.config import ConfigServerConfig
from configserver.jobs import JobEngine
from configserver.leader import PG_LEADER_KEY
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from tests.backends import fresh_database
from tests.sitehelpers import add_machine, add_procserver, step_running, wait_job


async def test_one_leader_runs_the_jobs_and_a_standby_takes_over(
        tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(JobEngine, "recheck_seconds", 0.2)
    url = await fresh_database(postgres_url)
    servers = [ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / n), listen_port=0,
                                               site_port=0, database_url=url))
               for n in ("a", "b")]
    a, b = servers
    await a.start()
    await b.start()
    try:
        async with ApiClient(b.url, b.admin_token) as api:
            await add_machine(api, "web01")
            await add_procserver(b.url, b.internal_token)
            job = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]
            # Created on the standby, run by the leader (long polls wake on the server that
            # made the change, so follow the job on the leader).
            async with ApiClient(a.url, a.admin_token) as lead:
                running = await wait_job(lead, job["id"], step_running("prepare_agent"))
            assert running["attempts"] == 1
            await a.stop()
            servers.remove(a)
            # The leader is gone: the standby takes the job over where it stood.
            resumed = await wait_job(api, job["id"], lambda j: j["attempts"] == 2)
            assert resumed["state"] == "running"
            assert [st["state"] for st in resumed["steps"]][:2] == ["succeeded", "running"]
    finally:
        for s in servers:
            await s.stop()


@pytest.fixture
async def pair(tmp_path: Path, postgres_url: str) -> AsyncIterator[tuple[ConfigServer,
                                                                        ConfigServer]]:
    """Two servers on one fresh catalog; the first started leads."""
    url = await fresh_database(postgres_url)
    a, b = (ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / n), listen_port=0,
                                            site_port=0, database_url=url))
            for n in ("a", "b"))
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await b.stop()
        await a.stop()


async def test_a_long_poll_on_the_standby_wakes_with_the_leaders_changes(
        pair: tuple[ConfigServer, ConfigServer]) -> None:
    """The job engine re-checks every 10 s and the long poll waits up to 60 s: only a
    notification across the servers answers within the test's deadline."""
    a, b = pair
    assert a.services.jobs.leading and not b.services.jobs.leading
    async with ApiClient(b.url, b.admin_token) as api:
        await add_machine(api, "web01")
        await add_procserver(b.url, b.internal_token)
        job = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]
        async with asyncio.timeout(8):  # well under the engine's 10 s re-check
            # made on the standby, run by the leader, seen by the standby's long poll
            changed = await api.get(f"/api/v1/jobs/{job['id']}", wait=60,
                                    version=job["version"])
            while step_running("prepare_agent")(changed) is False:
                changed = await api.get(f"/api/v1/jobs/{job['id']}", wait=60,
                                        version=changed["version"])
        assert changed["state"] == "running"


async def _cut_leader(postgres_url: str) -> int:
    """Terminate the backend that holds the job engine's leader lock; its pid."""
    conn = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://")
                                 + "/postgres")
    try:
        pid = await conn.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = $1", PG_LEADER_KEY)
        assert pid is not None
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        return int(pid)
    finally:
        await conn.close()


async def test_a_leader_whose_connection_is_cut_steps_down(
        pair: tuple[ConfigServer, ConfigServer], postgres_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    monkeypatch.setattr(JobEngine, "recheck_seconds", 0.2)
    async with ApiClient(b.url, b.admin_token) as api:
        await add_machine(api, "web01")
        await add_procserver(b.url, b.internal_token)
        job = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]
        running = await wait_job(api, job["id"], step_running("prepare_agent"))
        assert running["attempts"] == 1 and a.services.jobs.leading

        await _cut_leader(postgres_url)  # the server itself goes on running
        # The leader notices, stops its jobs and competes for the lock again (it may win
        # it back: it is healthy); whoever leads resumes the job where it stood.
        resumed = await wait_job(api, job["id"], lambda j: j["attempts"] == 2)
        assert resumed["state"] == "running"
        engines = [a.services.jobs, b.services.jobs]
        assert [e.leading for e in engines].count(True) == 1
        # nothing runs on two servers at once
        assert [job["id"] in e._running for e in engines].count(True) == 1
