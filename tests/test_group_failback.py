"""Re-protect and failback of a consistency group and of a recovery plan, each one job,
every part real: a configuration server, a process server, two machines (app01, db01)
each replicating an ext4 image through its own managed agent, the folder target.

The group is failed over to a group point, re-protected from the CLI (one job, both
items ``reprotected``) and failed back (one job: each original disk ends byte-exact
equal to its recovered machine's, the items ``protected``, the next cycle a delta). A
plan of the same machines in two groups fails back in the plan's order and stops at the
item that fails, naming it; the group run again passes by the item failed back already.
A failback of items never failed over is refused (409 naming them) and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from configserver.server import ConfigServer
from mobility.daemon import ManagedAgent
from mobility.siteclient import SiteClient
from procserver.server import ProcServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import make_vault, open_vault, run_cli
from tests.managedsite import (
    _registered,
    enroll_machine,
    issue_procserver_cert,
    procserver_config,
)
from tests.sitehelpers import next_job, step, wait_job
from tests.test_failback_job import _asking, _cat, _chattr, _ext4, _fsck_clean, _write
from vault.regkey import make_key

pytestmark = pytest.mark.root  # chattr +i: an original disk that cannot be written
MEMBERS = ["app01", "db01"]


@pytest.fixture
async def catalog_url(tmp_path: Path) -> str:
    """SQLite only: the catalog's dialects are covered by the plan and group tests."""
    return f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"


@dataclass
class Machine:
    name: str
    disk: Path  # the original machine's disk
    managed: ManagedAgent


@dataclass
class TwoSite:
    cs: ConfigServer
    api: ApiClient
    ps: ProcServer
    machines: dict[str, Machine]

    def recovered(self, m: str) -> Path:
        return Path(self.cs.cfg.data_dir) / "recovered" / m / "sda.img"

    async def group_point(self) -> str:
        """A group point of the members' newest cycles, reported as the process server
        reports a released barrier, once complete (every member's point in the
        catalog)."""
        cycles = {}
        for m, mach in self.machines.items():
            assert mach.managed.last is not None
            await self.ps.wait_point(mach.managed.last.cycle)
            cycles[m] = mach.managed.last.cycle
        gp = uuid.uuid4().hex
        async with ApiClient(self.cs.url, self.cs.internal_token) as internal:
            await internal.post("/api/v1/internal/group-points", {
                "id": gp, "group": "erp", "created": time.time(), "state": "released",
                "members": cycles})
        async with asyncio.timeout(60), self.cs.changed:
            while (await self.api.get(f"/api/v1/groups/erp/points/{gp}"))["state"] != \
                    "complete":
                await self.cs.changed.wait()
        return gp


@asynccontextmanager
async def two_machines(cs: ConfigServer, api: ApiClient, tmp: Path) -> AsyncIterator[TwoSite]:
    """ps1, the vault registered, app01 and db01 protected (one initial copy each) in the
    consistency group erp."""
    url, key = await make_vault(tmp)
    vault = await open_vault(tmp / "vault", key)
    try:
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
    finally:
        await vault.close()
    await issue_procserver_cert(api, tmp / "ps-tls")
    ps = ProcServer(procserver_config(tmp, url, key, cs.ca.cert_path, cs.site_url,
                                      cs.cfg.internal_token_path,
                                      heartbeat_interval_seconds=1.0))
    await ps.start()
    try:
        await _registered(cs, api)
        async with AsyncExitStack() as stack:
            machines = {}
            for m in MEMBERS:
                disk = tmp / f"{m}.img"
                _ext4(disk)
                cfg = await enroll_machine(api, cs.site_url, str(cs.ca.cert_path),
                                           cs.passphrase, m, disk, tmp / f"agent-{m}")
                sc = await stack.enter_async_context(
                    SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key))
                managed = ManagedAgent(cfg, sc)
                stack.callback(managed.close)
                await api.post("/api/v1/replication/enable", {"machine": m})
                job = await next_job(api, m, "enable_protection")
                assert await managed.round()  # the initial copy
                assert (await wait_job(api, job["id"]))["state"] == "succeeded"
                fin = await next_job(api, m, "finalize_protection")
                assert (await wait_job(api, fin["id"]))["state"] == "succeeded"
                machines[m] = Machine(m, disk, managed)
            # the longest interval: no barrier falls inside the test (its points are
            # reported as the process server reports them)
            await api.post("/api/v1/groups", {"name": "erp", "members": MEMBERS,
                                              "interval_seconds": 7 * 86400})
            yield TwoSite(cs, api, ps, machines)
    finally:
        await ps.stop()


async def _child(api: ApiClient, plan_job: str, start: str, m: str) -> dict[str, Any]:
    """The Failback job of ``m`` the plan job queued at its step ``start``."""
    await wait_job(api, plan_job, lambda j: step(j, start)["state"] == "succeeded",
                   timeout=120)
    job = await next_job(api, m, "failback")
    assert job["params"]["plan_job"] == plan_job, job
    return job


async def _answer(site: TwoSite, job: dict[str, Any], m: str) -> None:
    """``m``'s agent answers the failback request of its item job ``job``."""
    await wait_job(site.api, job["id"], _asking, timeout=120)
    assert not await site.machines[m].managed.round()  # writes the point and answers


async def _state(api: ApiClient, m: str) -> tuple[str, str | None]:
    item = await api.get(f"/api/v1/items/{m}")
    return item["state"], item["direction"]


async def test_a_group_reprotects_and_fails_back_as_one_job_and_a_plan_in_its_order(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    async with two_machines(cs, api, tmp_path) as site:
        # Never failed over: refused, naming each item, nothing changed.
        for verb, why in (("failback", "protected, not failed over (nothing to fail back)"),
                          ("reprotect", "protected")):
            with pytest.raises(ApiCallError) as e:
                await api.post(f"/api/v1/groups/erp/{verb}", {})
            assert (e.value.status, e.value.api_code) == (409, "plan_not_allowed")
            assert e.value.hint
            for m in MEMBERS:
                assert f"{m}: {why}" in str(e.value), e.value
        assert (await api.get("/api/v1/groups/erp"))["last_job"] is None
        for m in MEMBERS:
            assert await _state(api, m) == ("protected", "forward")

        # Failed over as a group.
        gp = await site.group_point()
        started = await api.post("/api/v1/groups/erp/failover", {"group_point": gp})
        assert (await wait_job(api, started["job"]["id"], timeout=120))["state"] == \
            "succeeded"
        written = {}
        for m in MEMBERS:
            written[m] = os.urandom(300_000)
            _write(site.recovered(m), "orders.db", written[m])

        # Re-protected as a group, from the CLI: one job, a step per item.
        r = await asyncio.to_thread(run_cli, "group", "reprotect", "erp", "--wait", "--json",
                                    "--api", cs.url, "--token-file", str(cs.cfg.token_path))
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        assert (job["kind"], job["state"]) == ("plan_reprotect", "succeeded"), job
        assert [s["name"] for s in job["steps"]] == ["g1_start", "item_app01", "item_db01"]
        for m in MEMBERS:
            rp = (await api.get(f"/api/v1/items/{m}"))["failover"]["reprotect"]
            assert f"Re-protect of {m} succeeded" in step(job, f"item_{m}")["message"]
            assert f"point {rp['last_point']} (" in step(job, f"item_{m}")["message"]
            assert "a delta)" in step(job, f"item_{m}")["message"]
            assert await _state(api, m) == ("reprotected", "reverse")

        # Failed back as a group: one job, both agents asked at once.
        want = {m: site.recovered(m).read_bytes() for m in MEMBERS}
        fb = (await api.post("/api/v1/groups/erp/failback", {}))["job"]
        assert fb["kind"] == "plan_failback" and not fb["cancellable"]
        children = {m: await _child(api, fb["id"], "g1_start", m) for m in MEMBERS}
        for m in MEMBERS:
            await _answer(site, children[m], m)
        done = await wait_job(api, fb["id"], timeout=120)
        assert done["state"] == "succeeded", done
        assert [s["name"] for s in done["steps"]] == ["g1_start", "item_app01", "item_db01"]
        for m, mach in site.machines.items():
            msg = step(done, f"item_{m}")["message"]
            assert f"Failback of {m} succeeded (job {children[m]['id']})" in msg
            assert "block(s) written onto the original machine" in msg
            assert mach.disk.read_bytes() == want[m]
            assert _cat(mach.disk, "orders.db") == written[m]
            assert _fsck_clean(mach.disk)
            assert not site.recovered(m).exists()
            assert await _state(api, m) == ("protected", "forward")
            assert await mach.managed.round()  # replication resumes: a delta, nothing new
            last = mach.managed.last
            assert last is not None and (last.kind, last.blocks_sent) == ("delta", 0)

        # Again, with a plan of two groups: app01 first, then db01, whose disk cannot be
        # written — the plan stops there, naming it.
        await api.post("/api/v1/plans", {"name": "erp-plan", "groups": [
            {"items": ["app01"]}, {"items": ["db01"]}]})
        gp = await site.group_point()
        started = await api.post("/api/v1/groups/erp/failover", {"group_point": gp})
        assert (await wait_job(api, started["job"]["id"], timeout=120))["state"] == \
            "succeeded"
        for m in MEMBERS:
            _write(site.recovered(m), "later.db", os.urandom(100_000))
        want = {m: site.recovered(m).read_bytes() for m in MEMBERS}
        db01 = site.machines["db01"].disk
        plan = (await api.post("/api/v1/plans/erp-plan/failback",
                               {"timeout_seconds": 120}))["job"]
        _chattr("+i", db01)
        try:
            app = await _child(api, plan["id"], "g1_start", "app01")
            assert app["params"]["timeout_seconds"] == 120  # the item option passed through
            await _answer(site, app, "app01")
            db = await _child(api, plan["id"], "g2_start", "db01")
            app = await api.get(f"/api/v1/jobs/{app['id']}")
            assert app["state"] == "succeeded" and app["ended"] <= db["created"]
            await _answer(site, db, "db01")
            failed = await wait_job(api, plan["id"], timeout=120)
        finally:
            _chattr("-i", db01)
        assert failed["state"] == "failed"
        assert step(failed, "item_db01")["state"] == "failed"
        assert failed["error"].startswith(f"group2: db01: the Failback job {db['id']} of db01 "
                                          "failed: "), failed["error"]
        assert "the agent could not write the point onto its disks" in failed["error"]
        assert await _state(api, "app01") == ("protected", "forward")
        assert (await _state(api, "db01"))[0] == "failed_over"

        # The group run again passes by app01 (failed back) and fails db01 back.
        again = (await api.post("/api/v1/groups/erp/failback", {}))["job"]
        await _answer(site, await _child(api, again["id"], "g1_start", "db01"), "db01")
        done = await wait_job(api, again["id"], timeout=120)
        assert done["state"] == "succeeded", done
        assert (f"app01 passed by: it is protected (failed back by job {app['id']}) "
                f"already") == step(done, "item_app01")["message"]
        assert "g1_start" in [s["name"] for s in done["steps"]]
        assert "queued for 2 item(s): db01 (job" in step(done, "g1_start")["message"]
        for m, mach in site.machines.items():
            assert mach.disk.read_bytes() == want[m]
            assert await _state(api, m) == ("protected", "forward")



def test_the_cli_refuses_a_timeout_below_one_second() -> None:
    for verb in ("plan", "group"):
        r = run_cli(verb, "failback", "erp", "--agent-timeout", "0", "--api",
                    "http://127.0.0.1:9")  # nothing listens: refused before any call
        assert r.returncode == 2, r
        assert "--agent-timeout: '0': give a number of seconds from 1" in r.stderr
