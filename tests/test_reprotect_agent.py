"""Re-protect through the Mobility agent inside the recovered machine, every part real:
a configuration server, a process server, the original machine's managed agent, the
folder target. The recovered machine boots from the original's disks, so its agent has
the original's certificate, configuration and state; only the machine it runs on
differs (its SMBIOS UUID, here each agent's own ``host_id_file``). The configuration
server tells the two apart: the copy gets none of the original's requests, replicates
only once re-protected through it, its first cycle sends only the blocks written since
the failover point (a resync by basis on that point), the next ones are deltas, and
failback starts from its newest point."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import create_async_engine

from configserver import db
from configserver.server import ConfigServer
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.hostid import read_host_id
from mobility.siteclient import SiteClient, SiteRefused
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import open_vault, restore_all, sha256
from tests.managedsite import Site
from tests.sitehelpers import step, step_running, until_changed, wait_job
from tests.test_failback_job import _asking, _cat, _differing, _write, failed_over

pytestmark = pytest.mark.root
ORIGINAL = "0c1e5a4b-7d3e-4f6a-9b2c-1d2e3f4a5b6c"
RECOVERED = "5f0e9d8c-7b6a-4c3d-8e2f-0a1b2c3d4e5f"


@pytest.fixture
async def catalog_url(tmp_path: Path) -> str:
    """SQLite only: the catalog's dialects are covered by the failover tests."""
    return f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"


def _uuid_file(path: Path, value: str) -> str:
    path.write_text(value.upper() + "\n")  # as the kernel shows it
    return str(path)


def test_host_ids_read_as_the_kernel_shows_them(tmp_path: Path) -> None:
    assert read_host_id(_uuid_file(tmp_path / "a", ORIGINAL)) == ORIGINAL
    for placeholder in ("00000000-0000-0000-0000-000000000000",
                        "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF", "Not Settable", ""):
        (tmp_path / "p").write_text(placeholder + "\n")
        assert read_host_id(str(tmp_path / "p")) is None
    assert read_host_id(str(tmp_path / "missing")) is None
    assert read_host_id("") is None


def _recovered_agent(site: Site, recovered: Path, tmp: Path) -> MobilityConfig:
    """The recovered machine's agent: the original's files, as its disk holds them, on a
    host of its own (``RECOVERED``)."""
    shutil.copytree(Path(site.cfg.state_dir), tmp / "recovered-state")
    return dataclasses.replace(
        site.cfg, state_dir=str(tmp / "recovered-state"),
        disks=[{"name": "sda", "path": str(recovered)}],
        host_id_file=_uuid_file(tmp / "recovered-uuid", RECOVERED))


async def test_reprotect_through_the_agent_in_the_recovered_machine(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    original_id = _uuid_file(tmp_path / "original-uuid", ORIGINAL)
    async with failed_over(cs, api, tmp_path, host_id_file=original_id) as (site, recovered):
        assert (await api.get("/api/v1/machines/web01"))["host_id"] == ORIGINAL
        bs = (await api.get("/api/v1/policies/default"))["block_size"]
        at_failover = recovered.read_bytes()
        failover_point = (await api.get("/api/v1/items/web01"))["failover"]["point"]

        cfg = _recovered_agent(site, recovered, tmp_path)
        async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as cp:
            copy = ManagedAgent(cfg, cp)
            try:
                await _scenario(cs, api, site, copy, recovered, at_failover,
                                failover_point, bs, tmp_path)
            finally:
                copy.close()


async def _scenario(cs: ConfigServer, api: ApiClient, site: Site, copy: ManagedAgent,
                    recovered: Path, at_failover: bytes, failover_point: str,
                    bs: int, tmp: Path) -> None:
    original, disk = site.managed, site.disk
    # Checked in, it is told apart and left idle; the machine stays the original's.
    assert not await copy.round()
    s = await copy.site.settings()
    assert (s.role, s.replicate, s.basis_point) == ("recovered", False, None)
    item = await api.get("/api/v1/items/web01")
    assert item["failover"]["recovered_agent"]["host_id"] == RECOVERED
    assert (await api.get("/api/v1/machines/web01"))["host_id"] == ORIGINAL
    assert (await original.site.settings()).role == "original"
    with pytest.raises(SiteRefused) as renewal:  # it would revoke the shared certificate
        await copy.site.renew()
    assert (renewal.value.status, renewal.value.code) == (409, "recovered_machine")
    copy.site.host_id = "not-a-uuid"  # a malformed one is refused, not taken for another
    try:
        with pytest.raises(SiteRefused) as bad:
            await copy.site.settings()
        assert (bad.value.status, bad.value.code) == (400, "bad_query")
    finally:
        copy.site.host_id = RECOVERED

    with pytest.raises(ApiCallError) as refused:
        await api.post("/api/v1/items/web01/reprotect", {"agent": True, "live": True})
    assert (refused.value.status, refused.value.api_code) == (422, "conflicting_options")

    # Business goes on in the recovered machine; then re-protect through its agent.
    orders = os.urandom(400_000)
    _write(recovered, "orders.db", orders)
    first = _differing(at_failover, recovered.read_bytes(), bs)
    job = (await api.post("/api/v1/items/web01/reprotect", {"agent": True}))["job"]
    await wait_job(api, job["id"], step_running("take"))
    assert not await original.round()  # the original stays idle
    assert await copy.round()
    assert copy.last is not None and copy.last.kind == "resync"
    assert copy.last.blocks_sent == first  # only what was written since the failover
    done = await wait_job(api, job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    item = await api.get("/api/v1/items/web01")
    rp = item["failover"]["reprotect"]
    assert (item["state"], item["direction"], rp["via"]) == ("reprotected", "reverse", "agent")
    assert f"point {rp['last_point']} from the agent in the recovered machine, a delta" in \
        step(done, "take")["message"]
    want1 = sha256(recovered)
    vault = await open_vault(tmp / "vault", tmp / "vault.key")
    try:
        p1 = await vault.read_point(rp["last_point"])
        assert p1.base == failover_point and p1.cycle == copy.last.cycle
        assert (await restore_all(vault, p1, tmp / "out1"))["sda"] == want1
    finally:
        await vault.close()

    # It goes on replicating: deltas on its own maps, each the re-protect's newest point.
    before = recovered.read_bytes()
    _write(recovered, "more.db", os.urandom(150_000))
    second = _differing(before, recovered.read_bytes(), bs)
    assert await copy.round()
    assert copy.last is not None and (copy.last.kind, copy.last.blocks_sent) == ("delta",
                                                                                second)
    newest = await site.ps.wait_point(copy.last.cycle)

    async def recorded() -> dict[str, Any] | None:
        rp = (await api.get("/api/v1/items/web01"))["failover"]["reprotect"]
        return rp if rp["last_point"] == newest else None
    rp = await until_changed(cs, recorded)
    assert rp["points"] == 2

    # Failback starts from that point: nothing left to take; the original is written.
    want = recovered.read_bytes()
    expected = _differing(disk.read_bytes(), want, bs)
    job = (await api.post("/api/v1/items/web01/failback", {}))["job"]
    await wait_job(api, job["id"], _asking, timeout=120)
    assert not await copy.round()  # never the failback's request, no cycle either
    assert (await copy.site.settings()).failback_request is None
    assert not await original.round()  # the original writes the point and answers
    done = await wait_job(api, job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert f"0 block(s) stored as a delta on point {newest}" in step(done, "take_disks")[
        "message"]
    assert f"{expected} of " in step(done, "write_back")["message"]
    assert disk.read_bytes() == want and _cat(disk, "orders.db") == orders

    # Failed back: the recovered host stays told apart, the original resumes its deltas.
    item = await api.get("/api/v1/items/web01")
    assert (item["state"], item["direction"]) == ("protected", "forward")
    assert not await copy.round()
    assert (await copy.site.settings()).role == "recovered"
    assert (await api.get("/api/v1/machines/web01"))["host_id"] == ORIGINAL
    assert await original.round()
    assert original.last is not None and (original.last.kind,
                                          original.last.blocks_sent) == ("delta", 0)


async def test_a_copy_is_told_apart_when_only_it_reports_a_host_id(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    """The original reports no host id (no SMBIOS there: its ``host_id_file`` is missing),
    the recovered copy's host does. While failed over the copy is not taken for the
    original (which does not start reporting one halfway through a failover): it would
    be handed the original's requests, and its host id recorded as the machine's."""
    no_smbios = str(tmp_path / "no-product-uuid")
    async with failed_over(cs, api, tmp_path, host_id_file=no_smbios) as (site, recovered):
        assert (await api.get("/api/v1/machines/web01"))["host_id"] is None
        cfg = _recovered_agent(site, recovered, tmp_path)
        async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as cp:
            copy = ManagedAgent(cfg, cp)
            try:
                assert not await copy.round()
                s = await copy.site.settings()
                assert (s.role, s.replicate, s.shutdown_request) == ("recovered", False, None)
                contact = (await api.get("/api/v1/machines/web01"))["last_contact"]
                await copy.site.heartbeat()
                item = await api.get("/api/v1/items/web01")
                assert item["state"] == "failed_over"
                assert item["failover"]["recovered_agent"]["host_id"] == RECOVERED
                assert item["failover"]["recovered_hosts"] == [RECOVERED]
                machine = await api.get("/api/v1/machines/web01")
                assert (machine["host_id"], machine["last_contact"]) == (None, contact)
                with pytest.raises(SiteRefused) as renewal:
                    await copy.site.renew()
                assert (renewal.value.status, renewal.value.code) == (409,
                                                                      "recovered_machine")
                assert (await site.managed.site.settings()).role == "original"
            finally:
                copy.close()


async def _plan_reprotect_waiting(api: ApiClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """A plan dr of web01 re-protected through the agents: its job and web01's, which
    waits for the recovered machine's first point."""
    await api.post("/api/v1/plans", {"name": "dr", "groups": [{"items": ["web01"]}]})
    plan_job = (await api.post("/api/v1/plans/dr/reprotect", {"agent": True}))["job"]
    await wait_job(api, plan_job["id"], step_running("item_web01"))
    (item_job,) = (await api.get("/api/v1/jobs", target="web01", kind="reprotect",
                                 active=True))["jobs"]
    await wait_job(api, item_job["id"], step_running("take"))
    return plan_job, item_job


async def test_cancelling_a_plan_re_protect_cancels_the_item_jobs_it_queued(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    """A plan's Re-protect through the agents waits for each recovered machine's first
    point (a day at most). Cancelled by its operator, the plan job cancels its items' jobs
    too, instead of leaving them waiting for that day."""
    async with failed_over(cs, api, tmp_path):
        plan_job, item_job = await _plan_reprotect_waiting(api)
        assert item_job["params"]["plan_job"] == plan_job["id"]
        done = await api.post(f"/api/v1/jobs/{plan_job['id']}/cancel")
        assert done["state"] == "cancelled"
        item_done = await api.get(f"/api/v1/jobs/{item_job['id']}")
        assert item_done["state"] == "cancelled"
        assert step(item_done, "take")["message"] == "cancelled by the operator"
        item = await api.get("/api/v1/items/web01")
        assert item["state"] == "failed_over"
        # Nothing of the plan runs any more: the item takes a new Re-protect.
        again = (await api.post("/api/v1/items/web01/reprotect", {"agent": True}))["job"]
        assert again["state"] == "queued"
        assert (await api.post(f"/api/v1/jobs/{again['id']}/cancel"))["state"] == "cancelled"


async def test_a_plan_cancel_cut_short_by_a_stop_still_ends_its_item_jobs(
        cs: ConfigServer, api: ApiClient, tmp_path: Path, catalog_url: str) -> None:
    """The plan job's cancel is durable before its item jobs' are. A configuration server
    stopped in between (the plan job ended cancelled, its item job still waiting for the
    recovered machine's first point) cancels that item job when it starts again, before
    the step it would resume at."""
    async with failed_over(cs, api, tmp_path):
        plan_job, item_job = await _plan_reprotect_waiting(api)
        await cs.stop()  # its jobs resume at the next start, where they stood
        engine = create_async_engine(catalog_url)
        try:  # what a stop between the plan job's cancel and its items' leaves
            async with engine.begin() as c:
                await c.execute(update(db.Job).where(db.Job.id == plan_job["id"]).values(
                    state="cancelled", error="cancelled by the operator"))
        finally:
            await engine.dispose()
        again = ConfigServer(dataclasses.replace(cs.cfg, listen_port=cs.port,
                                                 site_port=cs.site_port))
        await again.start()
        try:
            done = await wait_job(api, item_job["id"])
            assert done["state"] == "cancelled", done
            assert done["attempts"] == 2  # resumed, then ended before its step ran again
            assert step(done, "take")["message"] == (
                f"cancelled by the operator with its plan job {plan_job['id']}")
            assert step(done, "take")["attempts"] == 1
            assert (await api.get("/api/v1/items/web01"))["state"] == "failed_over"
        finally:
            await again.stop()
