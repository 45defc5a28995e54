"""Two configuration servers on one PostgreSQL catalog: one runs the jobs, the other stands
by and takes over when the first stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from configserver.config import ConfigServerConfig
from configserver.jobs import JobEngine
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
