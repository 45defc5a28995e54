"""A ``configserver run`` killed with kill -9 in the middle of a failover resumes it:
once while its restore waits for the vault, once inside the target's create (a ``cp``
stopped part way, ``tests/cpshim.py``). Real configuration server (SQLite and
PostgreSQL), real vault and points, the folder target."""

from __future__ import annotations

import asyncio
from pathlib import Path

from siterecovery.apiclient import ApiClient
from tests.cpshim import cp_shim, cp_stops, kill_stopped
from tests.failoversite import protect, register, sha256_of
from tests.helpers import Daemon, sha256, write_toml
from tests.sitehelpers import step, wait_job
from vault.locks import Lock, try_acquire
from vault.repo import Vault


async def test_kill9_during_a_failover_resumes_it(tmp_path: Path, catalog_url: str) -> None:
    data_dir = tmp_path / "cs"
    config = write_toml(tmp_path / "configserver.toml", {
        "data_dir": str(data_dir), "listen_port": 0, "site_port": 0,
        "database_url": catalog_url})
    args = ["configserver", "run", "--config", str(config)]
    first, second = Daemon(args, "configserver_started"), None
    started: list[Daemon] = []  # the servers of the kill inside create
    stopped: list[int] = []  # its stopped cp
    ready = await first.start()
    url, site_url = f"http://127.0.0.1:{ready['port']}", f"https://127.0.0.1:{ready['site_port']}"
    token = (data_dir / "api-token").read_text().strip()
    internal = (data_dir / "internal-token").read_text().strip()
    held: Lock | None = None
    vault: Vault | None = None
    try:
        async with ApiClient(url, token) as api:
            vault = await register(api, tmp_path)
            points, data = await protect(
                api, url, site_url, internal, data_dir / "ca" / "ca.pem",
                (data_dir / "enrollment-passphrase").read_text().strip(), tmp_path, vault)
            got = await try_acquire(vault, "exclusive", "test: a prune")  # the restore waits
            assert isinstance(got, Lock)
            held = got
            jid = (await api.post("/api/v1/items/web01/failover", {}))["job"]["id"]
            await first.wait_events("vault_locked_waiting", 1)
            before = await api.get(f"/api/v1/jobs/{jid}")
            assert step(before, "restore")["state"] == "running"
        await first.kill9()
        assert first.events("job_succeeded") == [] or all(
            e["job"] != jid for e in first.events("job_succeeded"))

        # the restarted server runs cp through a shim that can stop it part way (below)
        second = Daemon(args, "configserver_started", cp_shim(tmp_path / "cp-shim"))
        ready = await second.start()
        url = f"http://127.0.0.1:{ready['port']}"
        (resumed,) = await second.wait_events("job_resumed", 1)
        assert (resumed["job"], resumed["attempts"]) == (jid, 2)
        async with ApiClient(url, token) as api:
            assert (await api.get("/api/v1/items/web01"))["state"] == "failover_in_progress"
            await held.release()
            held = None
            done = await wait_job(api, jid, timeout=120)
            assert done["state"] == "succeeded" and done["attempts"] == 2, done
            for name in ("prerequisites", "shutdown_source", "stop_replication",
                         "select_point"):
                assert step(done, name) == step(before, name)  # done before the kill
                assert step(done, name)["attempts"] == 1
            assert step(done, "restore")["attempts"] == 2
            item = await api.get("/api/v1/items/web01")
            assert item["state"] == "failed_over" and item["failover"]["point"] == points[1].id
        image = data_dir / "recovered" / "web01" / "sda.img"
        assert sha256(image) == sha256_of(data[points[1].id])

        # killed again, inside the target's create: a change of point copying its image
        await _kill9_inside_create(second, args, token, tmp_path, started, stopped)
        assert sha256(image) == sha256_of(data[points[0].id])
        assert not (data_dir / "recovered" / "web01.partial").exists()
        assert sorted(p.name for p in (data_dir / "recovered").iterdir()) == ["web01"]
    finally:
        if held is not None:
            await held.release()
        if vault is not None:
            await vault.close()
        for d in (first, second, *started):
            if d is not None and d.proc is not None and d.proc.returncode is None:
                await d.stop()
        for pid in stopped:
            kill_stopped(pid)


async def _kill9_inside_create(stopping: Daemon, args: list[str], token: str,
                               tmp_path: Path, started: list[Daemon], stopped: list[int]
                               ) -> None:
    """Change web01's point back to the first one with ``cp`` stopped in the middle of
    the folder target's copy, kill -9 the server (``stopping``, running with the shim)
    there, start it again: the job resumes at its create step, which makes the machine
    whole. The server it starts goes on ``started``, the stopped cp's pid on
    ``stopped``: the caller ends them."""
    shim = tmp_path / "cp-shim"
    ready = stopping.ready
    async with cp_stops(shim) as told, \
            ApiClient(f"http://127.0.0.1:{ready['port']}", token) as api:
        points = (await api.get("/api/v1/points", machine="web01"))["points"]
        first = min(points, key=lambda p: str(p["created"]))["id"]
        jid = (await api.post("/api/v1/items/web01/change-recovery-point",
                              {"point": first}))["job"]["id"]
        stopped.append(await asyncio.wait_for(told, 120))
        before = await api.get(f"/api/v1/jobs/{jid}")
        assert step(before, "create")["state"] == "running", before
        item = await api.get("/api/v1/items/web01")  # named before create began
        folder = tmp_path / "cs" / "recovered" / "web01"
        assert item["failover"]["planned"]["resources"] == [f"folder:{folder}"]
        assert item["failover"]["recovered"] is None  # the other point's machine went
        half = folder.with_name("web01.partial") / "sda.img"
        assert half.stat().st_size == 65536  # the copy stopped part way
    await stopping.kill9()
    again = Daemon(args, "configserver_started")
    started.append(again)
    ready = await again.start()
    (resumed,) = await again.wait_events("job_resumed", 1)
    assert (resumed["job"], resumed["attempts"]) == (jid, 2)
    async with ApiClient(f"http://127.0.0.1:{ready['port']}", token) as api:
        done = await wait_job(api, jid, timeout=120)
        assert done["state"] == "succeeded" and done["attempts"] == 2, done
        for name in ("prerequisites", "select_point", "restore", "verify"):
            assert step(done, name)["attempts"] == 1, name  # done before the kill
        assert step(done, "create")["attempts"] == 2
        item = await api.get("/api/v1/items/web01")
        assert item["state"] == "failed_over" and item["failover"]["point"] == first
        assert item["failover"]["planned"] is None
