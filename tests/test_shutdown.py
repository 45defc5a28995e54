"""The configuration server's shutdown order (as uvicorn's): stop accepting, let requests in
flight finish within the grace period (the job engine and the catalog still work for
them), cancel what is left, then stop the background work and close the catalog.
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from configserver import db, server
from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from tests.sitehelpers import add_machine, add_procserver, step, wait_job

WAITING = "waiting for the Mobility agent to check in"


@pytest.fixture
async def cs(tmp_path: Path, catalog_url: str) -> AsyncIterator[ConfigServer]:
    """A configuration server the test stops itself (stopping again changes nothing)."""
    s = ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0,
                                        site_port=0, database_url=catalog_url))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def _in_flight(cs: ConfigServer, path: str) -> None:
    """Until the admin listener is handling a request for ``path``. (aiohttp has no public
    view or event for that, hence its request handlers' own attribute, polled.)"""
    runner = cs._runners[0]

    def handling() -> bool:
        return runner.server is not None and any(
            c._current_request is not None and c._current_request.path == path
            for c in runner.server.connections)

    async with asyncio.timeout(30):
        while not handling():  # noqa: ASYNC110 (nothing to wait on)
            await asyncio.sleep(0.01)


async def _refused(port: int) -> None:
    """Until the port no longer accepts connections."""
    async with asyncio.timeout(30):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except (ConnectionRefusedError, ConnectionResetError):  # reset: closed mid-accept
                return
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.01)


async def _waiting_job(cs: ConfigServer, api: ApiClient) -> dict[str, Any]:
    """A job whose Prepare the Mobility agent step waits for an agent that never calls."""
    await add_procserver(cs.url, cs.internal_token)
    await add_machine(api, "web01")
    jid = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]["id"]
    return await wait_job(api, jid,
                          lambda j: step(j, "prepare_agent")["message"].endswith(WAITING))


async def _long_poll(cs: ConfigServer, http: aiohttp.ClientSession, job: dict[str, Any],
                     wait: int) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{cs.url}/api/v1/jobs/{job['id']}",
                        params={"version": job["version"], "wait": str(wait)},
                        headers={"Authorization": f"Bearer {cs.admin_token}"}) as r:
        doc: dict[str, Any] = await r.json()
        return r.status, doc


async def test_a_request_in_flight_is_answered_while_the_server_stops(
        cs: ConfigServer) -> None:
    async with ApiClient(cs.url, cs.admin_token) as api:
        job = await _waiting_job(cs, api)
    async with aiohttp.ClientSession() as http:
        poll = asyncio.create_task(_long_poll(cs, http, job, wait=50))
        await _in_flight(cs, f"/api/v1/jobs/{job['id']}")
        stopping = asyncio.create_task(cs.stop())
        await _refused(cs.port)  # stopped accepting, still draining
        assert not stopping.done()
        # The agent checks in now: the job engine still runs, so the job moves on and the
        # long poll (started before the stop) answers with the change, long before its wait.
        async with cs.sessionmaker() as s:
            machine = await s.get_one(db.Machine, "web01")
            machine.last_contact = cs.clock()
            await s.commit()
        await cs.notify()
        async with asyncio.timeout(30):
            status, doc = await poll
        await stopping
    assert status == 200
    assert doc["version"] != job["version"]
    assert step(doc, "prepare_agent")["state"] == "succeeded"


async def test_a_request_past_the_grace_period_is_cancelled(
        tmp_path: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "SHUTDOWN_GRACE_SECONDS", 0.5)
    cs = ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0,
                                         site_port=0, database_url=catalog_url))
    await cs.start()
    try:
        async with ApiClient(cs.url, cs.admin_token) as api:
            job = await _waiting_job(cs, api)
        async with aiohttp.ClientSession() as http:
            poll = asyncio.create_task(_long_poll(cs, http, job, wait=50))
            await _in_flight(cs, f"/api/v1/jobs/{job['id']}")
            async with asyncio.timeout(20):  # the grace period, not the poll's 50 s
                await cs.stop()
            # The connection is dropped (aiohttp's client retries a GET once, and then
            # finds the port closed): no answer.
            with pytest.raises(aiohttp.ClientError):
                await poll
    finally:
        await cs.stop()
