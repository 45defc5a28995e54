"""The Failback job, every part real: a configuration server, a process server, the
original machine's managed agent replicating an ext4 image, the folder target. After a
failover, files are written on the recovered machine; the failback takes its disks into
the vault, the original machine's agent writes only the blocks that differ, the
recovered machine is removed, and replication resumes as a delta (no initial copy)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.backends import missing_backend
from tests.helpers import open_vault
from tests.managedsite import Site, managed_site
from tests.sitehelpers import next_job, step, wait_job
from vault.regkey import make_key

pytestmark = pytest.mark.root
DISK = 16 << 20


@pytest.fixture
async def catalog_url(tmp_path: Path) -> str:
    """SQLite only: the catalog's dialects are covered by the failover tests."""
    return f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"


def _ext4(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(DISK)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(path)], check=True)


def _write(disk: Path, name: str, data: bytes) -> None:
    src = disk.with_name(name)
    src.write_bytes(data)
    subprocess.run(["debugfs", "-w", "-R", f"write {src} {name}", str(disk)], check=True,
                   capture_output=True)


def _cat(disk: Path, name: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {name}", str(disk)], check=True,
                          capture_output=True).stdout


def _asking(job: dict[str, Any]) -> bool:
    """Failback's write step asked the agent (its request is in the agent's settings)."""
    return "asking" in (step(job, "write_back").get("message") or "")


def _chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True)


def _fsck_clean(disk: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True).returncode == 0


def _differing(a: bytes, b: bytes, bs: int) -> int:
    return sum(a[o:o + bs] != b[o:o + bs] for o in range(0, len(a), bs))


@asynccontextmanager
async def failed_over(cs: ConfigServer, api: ApiClient, tmp_path: Path, **agent: Any
                      ) -> AsyncIterator[tuple[Site, Path]]:
    """web01 protected by its managed agent (one initial copy; ``agent``: mobility.toml
    values), then failed over onto the folder target; the site and the recovered
    machine's image."""
    for tool in ("mkfs.ext4", "debugfs", "e2fsck"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs e2fsprogs")
    async with managed_site(cs, api, tmp_path, make_disk_with=_ext4,
                            procserver={"heartbeat_interval_seconds": 1.0}, **agent) as site:
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
        for verb in ("failback", "reprotect"):  # not failed over
            with pytest.raises(ApiCallError) as refused:
                await api.post(f"/api/v1/items/web01/{verb}", {})
            assert refused.value.status == 409
        done = await wait_job(api, (await api.post("/api/v1/items/web01/failover", {
            "point": "latest"}))["job"]["id"], timeout=120)
        assert done["state"] == "succeeded", done
        yield site, Path(cs.cfg.data_dir) / "recovered" / "web01" / "sda.img"


async def _run(api: ApiClient, verb: str) -> dict[str, Any]:
    done = await wait_job(api, (await api.post(f"/api/v1/items/web01/{verb}", {}))[
        "job"]["id"], timeout=120)
    assert done["state"] == "succeeded", done
    return done


@pytest.mark.parametrize("commit", [False, True], ids=["failed_over", "committed"])
async def test_failback_writes_only_the_differences_and_replication_resumes(
        cs: ConfigServer, api: ApiClient, tmp_path: Path, commit: bool) -> None:
    """From failed_over the recovered disks go into the vault as a delta on the failover
    point; once committed (the points are gone) whole: the agent writes the same
    differences either way."""
    async with failed_over(cs, api, tmp_path) as (site, recovered):
        if commit:
            await _run(api, "commit")
        # Business goes on on the recovered machine; the original lies stale.
        orders = os.urandom(700_000)
        _write(recovered, "orders.db", orders)
        _write(site.disk, "stale.tmp", os.urandom(50_000))
        want = recovered.read_bytes()
        bs = (await api.get("/api/v1/policies/default"))["block_size"]
        expected = _differing(site.disk.read_bytes(), want, bs)
        assert expected > 0

        job = (await api.post("/api/v1/items/web01/failback", {}))["job"]
        assert (await api.get("/api/v1/items/web01"))["state"] == "failback_in_progress"
        await wait_job(api, job["id"], _asking, timeout=120)
        s = await site.managed.site.settings()
        assert s.replicate is False and s.failback_request is not None
        assert not await site.managed.round()  # the agent writes the point and answers
        done = await wait_job(api, job["id"], timeout=120)
        assert done["state"] == "succeeded", done
        assert [st["name"] for st in done["steps"]] == [
            "prerequisites", "take_disks", "write_back", "remove_recovered", "record"]
        assert ("whole (the failover point is gone)" if commit else
                "as a delta on point") in step(done, "take_disks")["message"]
        assert (f"{expected} of {DISK // bs} block(s) differed and were written"
                in step(done, "write_back")["message"])
        assert site.disk.read_bytes() == want
        assert _cat(site.disk, "orders.db") == orders  # written while failed over
        assert _fsck_clean(site.disk)
        assert not recovered.parent.exists()
        item = await api.get("/api/v1/items/web01")
        assert item["state"] == "protected"
        fb = item["failover"]["failback"]
        assert (fb["job"], fb["result"], fb["blocks_written"]) == (job["id"], "succeeded",
                                                                   expected)

        # Re-protected in the original direction: the next cycle is a delta on the
        # failback point, with nothing to send.
        assert await site.managed.round()
        last = site.managed.last
        assert last is not None and (last.kind, last.blocks_sent) == ("delta", 0)


async def test_reprotect_takes_deltas_and_failback_starts_from_the_newest(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    """Re-protect stores the recovered machine's writes since the failover point (not a
    full copy), then since its own last point; failback then writes only the blocks the
    original machine lacks."""
    async with failed_over(cs, api, tmp_path) as (site, recovered):
        bs = (await api.get("/api/v1/policies/default"))["block_size"]
        assert (await api.get("/api/v1/items/web01"))["direction"] is None
        at_failover = recovered.read_bytes()
        _write(recovered, "orders.db", os.urandom(400_000))
        first = _differing(at_failover, recovered.read_bytes(), bs)
        done = await _run(api, "reprotect")
        item = await api.get("/api/v1/items/web01")
        fo = item["failover"]
        assert (item["state"], item["direction"]) == ("reprotected", "reverse")
        assert f"{first} block(s) stored as a delta on point {fo['point']}" in step(
            done, "take")["message"]
        rp = fo["reprotect"]
        assert (rp["points"], rp["last_blocks_stored"], rp["last_full"]) == (1, first, False)

        before = recovered.read_bytes()
        _write(recovered, "more.db", os.urandom(200_000))
        second = _differing(before, recovered.read_bytes(), bs)
        done = await _run(api, "reprotect")
        assert (f"{second} block(s) stored as a delta on point {rp['last_point']}"
                in step(done, "take")["message"])
        last = (await api.get("/api/v1/items/web01"))["failover"]["reprotect"]["last_point"]

        want = recovered.read_bytes()
        expected = _differing(site.disk.read_bytes(), want, bs)
        # The original disk cannot be written: the agent answers with its error, the
        # failback fails and gives the item back, re-protected.
        _chattr("+i", site.disk)
        try:
            job = (await api.post("/api/v1/items/web01/failback", {}))["job"]
            await wait_job(api, job["id"], _asking, timeout=120)
            assert not await site.managed.round()
            failed = await wait_job(api, job["id"], timeout=120)
        finally:
            _chattr("-i", site.disk)
        assert failed["state"] == "failed"
        assert "the agent could not write the point onto its disks" in failed["error"]
        assert (await api.get("/api/v1/items/web01"))["state"] == "reprotected"

        # The recovered machine written again between failback's take and its removal
        # (started again meanwhile): the removal refuses and leaves it, the failback
        # fails; run again, it takes the disks as they stand, the late writes included.
        job = (await api.post("/api/v1/items/web01/failback", {}))["job"]
        await wait_job(api, job["id"], _asking, timeout=120)
        taken = await wait_job(api, job["id"], _asking, timeout=1)
        assert f"0 block(s) stored as a delta on point {last}" in step(
            taken, "take_disks")["message"]  # nothing written since the last re-protect
        late = os.urandom(100_000)
        _write(recovered, "late.db", late)
        assert not await site.managed.round()  # the point taken before is written
        failed = await wait_job(api, job["id"], timeout=120)
        assert failed["state"] == "failed", failed
        assert f"{expected} of " in step(failed, "write_back")["message"]
        assert site.disk.read_bytes() == want  # as taken: without the late writes
        assert step(failed, "remove_recovered")["state"] == "failed"
        assert "changed after failback took them" in failed["error"]
        assert "run the failback again" in failed["error"]
        assert recovered.exists() and _cat(recovered, "late.db") == late
        assert (await api.get("/api/v1/items/web01"))["state"] == "reprotected"

        want = recovered.read_bytes()
        job = (await api.post("/api/v1/items/web01/failback", {}))["job"]
        await wait_job(api, job["id"], _asking, timeout=120)
        assert not await site.managed.round()
        done = await wait_job(api, job["id"], timeout=120)
        assert done["state"] == "succeeded", done
        assert site.disk.read_bytes() == want and _cat(site.disk, "late.db") == late
        assert not recovered.parent.exists()
        item = await api.get("/api/v1/items/web01")
        assert (item["state"], item["direction"]) == ("protected", "forward")
        assert item["failover"]["reprotect"]["ended"] is not None

