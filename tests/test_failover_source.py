"""Failover with nothing acknowledged left behind, every part real: a configuration
server (SQLite and PostgreSQL), a process server reporting over the site listener, a
managed Mobility agent replicating an image file, and the folder target.

Data written after the newest point is carried by the agent's last cycle when the
failover asks for the source's shutdown, and the point ``latest`` waits until the
process server has put that cycle into the vault: the recovered disk is the source disk
as it was when it shut down, byte for byte. An agent that does not answer leaves the
failover going on, saying so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from configserver.server import ConfigServer
from mobility.daemon import ManagedAgent
from mobility.shutdown import answered
from mobility.siteclient import SiteRefused
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests.backends import missing_backend
from tests.helpers import open_vault, sha256
from tests.managedsite import managed_site
from tests.sitehelpers import next_job, step, wait_job
from vault.locks import acquire
from vault.regkey import make_key

DISK = 16 << 20


def _need_e2fsprogs() -> None:
    for tool in ("mkfs.ext4", "debugfs", "e2fsck"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs e2fsprogs")


def _ext4(path: Path) -> None:
    """A whole-disk ext4 (the drill's checks want a filesystem to check)."""
    with open(path, "wb") as f:
        f.truncate(DISK)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(path)], check=True)


def _write(disk: Path, name: str, data: bytes) -> None:
    """Write a file into the disk's filesystem (debugfs: no mount needed)."""
    src = disk.with_name(name)
    src.write_bytes(data)
    subprocess.run(["debugfs", "-w", "-R", f"write {src} {name}", str(disk)], check=True,
                   capture_output=True)


@dataclass
class Protected:
    api: ApiClient
    ps: ProcServer
    managed: ManagedAgent
    disk: Path
    marker: Path  # what the agent's shutdown command writes
    recovered: Path


@pytest.fixture
async def protected(cs: ConfigServer, api: ApiClient, tmp_path: Path
                    ) -> AsyncIterator[Protected]:
    """web01 protected through the real path (its vault registered with the
    configuration server, which recovers from it): one initial cycle, its point in the
    vault and in the catalog."""
    _need_e2fsprogs()
    marker = tmp_path / "shut-down"
    async with managed_site(cs, api, tmp_path, make_disk_with=_ext4,
                            procserver={"heartbeat_interval_seconds": 1.0},
                            shutdown_command=["touch", str(marker)]) as site:
        vault = await open_vault(tmp_path / "vault", Path(site.pcfg.vault_key_file))
        try:
            await api.post("/api/v1/registration", {
                "key": json.dumps(make_key(vault, site.pcfg.vault_url, time.time())),
                "vault_key_file": site.pcfg.vault_key_file})
        finally:
            await vault.close()
        job = await next_job(api, "web01", "enable_protection")
        assert await site.managed.round()  # the initial copy
        assert (await wait_job(api, job["id"]))["state"] == "succeeded"
        fin = await next_job(api, "web01", "finalize_protection")
        assert (await wait_job(api, fin["id"]))["state"] == "succeeded"
        assert site.managed.last is not None
        await site.ps.wait_point(site.managed.last.cycle)
        yield Protected(api, site.ps, site.managed, site.disk, marker,
                        Path(cs.cfg.data_dir) / "recovered" / "web01")


async def test_failover_with_source_shutdown_loses_nothing_acknowledged(
        protected: Protected) -> None:
    p, api = protected, protected.api
    first = (await api.get("/api/v1/items/web01"))["latest_point"]
    _write(p.disk, "orders.db", os.urandom(1 << 20))  # after the newest point: only a
    # last cycle has it
    written = sha256(p.disk)
    job = (await api.post("/api/v1/items/web01/failover", {
        "point": "latest", "shutdown_source": True, "shutdown_timeout_seconds": 300}))["job"]
    # the step's asking message comes after its request is recorded; "running" alone
    # may be seen before (a pull then would not carry the request yet)
    await wait_job(api, job["id"], lambda j: "asking the source's agent" in (
        step(j, "shutdown_source").get("message") or ""))
    s = await p.managed.site.settings()  # what the agent pulls now
    assert (s.replicate, s.shutdown_request) == (False, job["id"])
    assert await p.managed.round()  # the last cycle, the answer, the shutdown command
    assert p.marker.exists() and answered(p.managed.cfg.state_dir) == job["id"]
    last = p.managed.last
    assert last is not None and last.kind == "delta" and last.blocks_sent > 0
    done = await wait_job(api, job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert f"last cycle {last.cycle} acknowledged" in step(done, "shutdown_source")["message"]
    assert "drained" in step(done, "select_point")["message"]
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "failed_over"
    shut = item["failover"]["shutdown"]
    assert (shut["request"], shut["cycle"], shut["result"]) == (job["id"], last.cycle,
                                                               "shut down")
    assert item["failover"]["point"] != first
    assert item["failover"]["drain"]["procserver"] == "ps1"
    assert sha256(p.recovered / "sda.img") == written  # byte for byte what it shut down with
    # answered once: the next rounds neither cycle nor shut down again
    p.marker.unlink()
    assert not await p.managed.round()
    assert not p.marker.exists()


async def test_a_source_that_does_not_answer_is_left_and_the_failover_goes_on(
        protected: Protected) -> None:
    """The agent is away (no round runs): the failover waits its timeout, says so, and
    recovers the newest point the vault holds."""
    api = protected.api
    point = (await api.get("/api/v1/items/web01"))["latest_point"]
    job = (await api.post("/api/v1/items/web01/failover", {
        "shutdown_source": True, "shutdown_timeout_seconds": 1}))["job"]
    done = await wait_job(api, job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    message = step(done, "shutdown_source")["message"]
    assert "did not answer within 1 s" in message and "going on" in message
    item = await api.get("/api/v1/items/web01")
    assert (item["failover"]["point"], item["failover"]["shutdown"]["result"]) == (
        point, "no answer")
    # a late answer to that request is still recorded; an unknown one is refused
    site = protected.managed.site
    await site.report_shutdown(job["id"], "shutdown_failed", None, "not permitted")
    with pytest.raises(SiteRefused, match="no_shutdown_request"):
        await site.report_shutdown("nosuch", "shutting_down", None, None)
    item = await api.get("/api/v1/items/web01")
    assert item["failover"]["shutdown"]["shutdown_error"] == "not permitted"


async def test_latest_waits_for_what_the_process_server_still_holds(
        protected: Protected, tmp_path: Path) -> None:
    """A drill of 'latest' while the process server holds an acknowledged cycle it cannot
    upload yet (a prune holds the vault) waits for it, and recovers that cycle's point."""
    p, api = protected, protected.api
    vault = await open_vault(tmp_path / "vault", tmp_path / "vault.key")
    # the upload waits (taken once the process server's own retention, if it runs, let go)
    held = await acquire(vault, "exclusive", "test: a prune", wait=120)
    try:
        _write(p.disk, "late.txt", os.urandom(300_000))
        assert await p.managed.round()  # acknowledged: in the process server's cache only
        assert p.managed.last is not None
        job = (await api.post("/api/v1/items/web01/test-failover", {"point": "latest"}))["job"]
        await wait_job(api, job["id"], lambda j: "upload 1 acknowledged cycle(s)" in step(
            j, "select_point")["message"])
    finally:
        await held.release()
        await vault.close()
    done = await wait_job(api, job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    item = await api.get("/api/v1/items/web01")
    assert item["last_drill"]["point"] == await p.ps.wait_point(p.managed.last.cycle)
    assert "drained" in step(done, "select_point")["message"]
    assert sha256(p.recovered / "sda.img") == sha256(p.disk)
