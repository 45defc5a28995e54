"""Replicated items and the replication jobs through the real APIs (SQLite and PostgreSQL):
enable → agent heartbeat → progress → point → Finalize protection → protected; disable;
bad requests change nothing."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from configserver import install
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.csclock import Clock, clocked_configserver
from tests.sitehelpers import (
    AgentSite,
    add_machine,
    add_procserver,
    next_job,
    report_point,
    step,
    step_running,
    wait_job,
)

P1, P2, P3 = "1" * 64, "2" * 64, "3" * 64


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cs(tmp_path: Path, catalog_url: str, clock: Clock) -> AsyncIterator[ConfigServer]:
    """The configuration server of every test here runs on ``clock`` (SQLite, PostgreSQL)."""
    async with clocked_configserver(tmp_path / "cs", catalog_url, clock) as server:
        yield server


async def _setup(cs: ConfigServer, api: ApiClient, tmp_path: Path, name: str = "web01"
                 ) -> AgentSite:
    await add_procserver(cs.url, cs.internal_token)
    await add_machine(api, name)
    return await AgentSite.enroll(cs.site_url, cs.ca.cert_path, name, cs.passphrase,
                                  tmp_path / "agent")


async def _enable(api: ApiClient, name: str, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = (await api.post("/api/v1/replication/enable",
                                          {"machine": name, **kw}))["job"]
    return doc


async def test_enable_to_protected(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    agent = await _setup(cs, api, tmp_path)
    job = await _enable(api, "web01")
    assert job["kind"] == "enable_protection" and job["title"] == "Enable protection"
    # the site listener a pushed agent is to follow (the server's own, from its settings)
    assert job["state"] == "queued" and job["params"] == {
        "policy": "default", "site_url": install.site_url(cs.cfg)}
    assert [s["name"] for s in job["steps"]] == ["validate", "prepare_agent",
                                                  "initial_replication"]
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "enabling" and item["policy"] == "default"
    assert item["latest_point"] is None and item["rpo_seconds"] is None

    job = await wait_job(api, job["id"], step_running("prepare_agent"))
    assert step(job, "validate")["state"] == "succeeded"
    assert "process server ps1" in step(job, "validate")["message"]
    assert (await api.get("/api/v1/machines/web01"))["process_server"] == "ps1"

    async with agent:
        status, hb = await agent.heartbeat("1.2.3")
        assert status == 200 and hb["replicate"] is True
        job = await wait_job(api, job["id"], step_running("initial_replication"))
        assert "agent 1.2.3 checked in" in step(job, "prepare_agent")["message"]
        status, settings = await agent.settings()
        assert status == 200
        assert [d["name"] for d in settings["disks"]] == ["sda", "sdb"]
        assert settings["process_server"] == {"name": "ps1", "address": "127.0.0.1:9443"}
        assert settings["policy"]["name"] == "default"
        assert settings["policy"]["block_size"] == 65536
        assert settings["replicate"] is True and settings["item_state"] == "initial_replication"

        status, item = await agent.progress({"sda": 100, "sdb": 50})
        assert status == 200 and item["initial_progress"] == 75.0
        job = await wait_job(api, job["id"],
                             lambda j: step(j, "initial_replication")["progress"] == 75.0)
        assert job["state"] == "running" and 66 < job["progress"] < 100
        status, item = await agent.progress({"sdb": 100})
        assert item["initial_progress"] == 100.0 and item["state"] == "initial_replication"
        job = await wait_job(api, job["id"], lambda j: "first recovery point" in
                             step(j, "initial_replication")["message"])
        assert job["state"] == "running"  # copied, but no point yet

    created = dt.datetime.fromtimestamp(cs.clock() - 30, dt.UTC).isoformat()
    await report_point(cs.url, cs.internal_token, "web01", P1, created)
    job = await wait_job(api, job["id"])
    assert job["state"] == "succeeded", job
    assert job["progress"] == 100.0 and job["attempts"] == 1 and job["error"] is None
    assert all(s["state"] == "succeeded" and s["started"] and s["ended"] for s in job["steps"])

    fin = await next_job(api, "web01", "finalize_protection")
    assert fin["params"] == {"policy": "default", "site_url": install.site_url(cs.cfg),
                             "after": job["id"]}
    fin = await wait_job(api, fin["id"])
    assert fin["state"] == "succeeded", fin
    assert P1 in step(fin, "record_first_point")["message"]

    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "protected" and item["health"] == "normal"
    assert item["latest_point"] == P1 and item["latest_app_point"] is None
    assert 29 <= item["rpo_seconds"] < 60
    listed = (await api.get("/api/v1/items"))["items"]
    assert [(i["machine"], i["state"]) for i in listed] == [("web01", "protected")]
    listed = (await api.get("/api/v1/items", state="protected"))["items"]
    assert [i["machine"] for i in listed] == ["web01"]
    assert (await api.get("/api/v1/items", state="enabling"))["items"] == []


async def test_points_move_latest_and_app_points_forward(cs: ConfigServer, api: ApiClient,
                                                        tmp_path: Path, clock: Clock) -> None:
    await _setup(cs, api, tmp_path)
    await _enable(api, "web01")
    base = cs.clock()

    def at(offset: float) -> str:
        return dt.datetime.fromtimestamp(base + offset, dt.UTC).isoformat()

    await report_point(cs.url, cs.internal_token, "web01", P1, at(-100), "app")
    await report_point(cs.url, cs.internal_token, "web01", P2, at(-10), "crash")
    await report_point(cs.url, cs.internal_token, "web01", P3, at(-50), "crash")  # late report
    item = await api.get("/api/v1/items/web01")
    assert item["latest_point"] == P2 and item["latest_app_point"] == P1
    assert item["latest_point_time"] == at(-10)[:19] + "Z"
    assert item["latest_app_point_time"] == at(-100)[:19] + "Z"
    clock.now = base + 90  # an injected clock ages the point
    item = await api.get("/api/v1/items/web01")
    assert item["rpo_seconds"] == 100.0
    # points of a machine without an item are catalogued and touch no item
    await report_point(cs.url, cs.internal_token, "other", "4" * 64)
    assert [i["machine"] for i in (await api.get("/api/v1/items"))["items"]] == ["web01"]


async def test_rpo_over_threshold_is_a_warning(cs: ConfigServer, api: ApiClient,
                                               tmp_path: Path, clock: Clock) -> None:
    agent = await _setup(cs, api, tmp_path)
    job = await _enable(api, "web01")
    async with agent:
        await agent.heartbeat()
        await agent.progress({"sda": 100, "sdb": 100})
    await report_point(cs.url, cs.internal_token, "web01", P1,
                       dt.datetime.fromtimestamp(cs.clock(), dt.UTC).isoformat())
    await wait_job(api, job["id"])
    fin = await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
    assert fin["state"] == "succeeded"
    item = await api.get("/api/v1/items/web01")
    assert item["health"] == "normal" and item["health_errors"] == []
    now = cs.clock()
    clock.now = now + 15 * 60 + 5  # the default policy's threshold is 15 min
    item = await api.get("/api/v1/items/web01")
    assert item["health"] == "warning" and item["rpo_threshold_seconds"] == 900
    assert "exceeds the policy's threshold" in item["health_errors"][0]


async def test_enable_refusals_change_nothing(cs: ConfigServer, api: ApiClient,
                                              tmp_path: Path) -> None:
    await _setup(cs, api, tmp_path)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"machine": "nosuch"}, 404, "machine_not_found"),
        ({"machine": "web01", "policy": "nosuch"}, 404, "policy_not_found"),
        ({"machine": "../x"}, 422, "invalid_request"),
        ({"machine": "web01", "extra": 1}, 422, "invalid_request"),
        ({}, 422, "invalid_request"),
    ]
    for body, status, code in cases:
        with pytest.raises(ApiCallError) as e:
            await api.post("/api/v1/replication/enable", body)
        assert (e.value.status, e.value.api_code) == (status, code), body
    with pytest.raises(ApiCallError) as e:
        await api.post("/api/v1/replication/disable", {"machine": "web01"})
    assert (e.value.status, e.value.api_code) == (404, "item_not_found")
    assert (await api.get("/api/v1/items"))["items"] == []
    assert (await api.get("/api/v1/jobs"))["jobs"] == []

    await api.patch("/api/v1/machines/web01", {"enabled": False})
    with pytest.raises(ApiCallError) as e:
        await _enable(api, "web01")
    assert (e.value.status, e.value.api_code) == (409, "machine_disabled")
    assert (await api.get("/api/v1/items"))["items"] == []
    await api.patch("/api/v1/machines/web01", {"enabled": True})

    job = await _enable(api, "web01")
    with pytest.raises(ApiCallError) as e:
        await _enable(api, "web01")
    assert (e.value.status, e.value.api_code) == (409, "already_enabling")
    assert [j["id"] for j in (await api.get("/api/v1/jobs"))["jobs"]] == [job["id"]]
    with pytest.raises(ApiCallError) as e:
        await api.get("/api/v1/items/nosuch")
    assert (e.value.status, e.value.api_code) == (404, "item_not_found")
    with pytest.raises(ApiCallError) as e:
        await api.get("/api/v1/items", state="bogus")
    assert e.value.status == 400


async def test_enable_fails_clearly_without_a_process_server(cs: ConfigServer, api: ApiClient
                                                            ) -> None:
    await add_machine(api, "web01")
    job = await wait_job(api, (await _enable(api, "web01"))["id"])
    assert job["state"] == "failed"
    assert job["error"].startswith("Prerequisites check: no process server is registered")
    assert step(job, "validate")["state"] == "failed"
    assert [s["state"] for s in job["steps"][1:]] == ["skipped", "skipped"]
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "enable_failed" and item["health"] == "critical"
    assert item["health_errors"] == [job["error"]]
    assert await api.get("/api/v1/jobs", target="web01", kind="finalize_protection") == \
        {"jobs": []}
    # once a process server exists, enabling again starts over
    await add_procserver(cs.url, cs.internal_token)
    job2 = await wait_job(api, (await _enable(api, "web01"))["id"], step_running("prepare_agent"))
    assert job2["id"] != job["id"]
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "enabling" and item["health"] == "normal"


async def test_disable_cancels_enable_then_removes_the_item(cs: ConfigServer, api: ApiClient,
                                                            tmp_path: Path) -> None:
    await _setup(cs, api, tmp_path)
    enable = await wait_job(api, (await _enable(api, "web01"))["id"],
                            step_running("prepare_agent"))
    disable = (await api.post("/api/v1/replication/disable", {"machine": "web01"}))["job"]
    assert disable["kind"] == "disable_protection"
    with pytest.raises(ApiCallError) as e:
        await api.post("/api/v1/replication/disable", {"machine": "web01"})
    assert (e.value.status, e.value.api_code) == (409, "already_disabling")
    enable = await api.get(f"/api/v1/jobs/{enable['id']}")
    assert enable["state"] == "cancelled"
    assert step(enable, "prepare_agent")["state"] == "failed"
    assert step(enable, "prepare_agent")["message"] == "cancelled by the operator"
    disable = await wait_job(api, disable["id"])
    assert disable["state"] == "succeeded", disable
    assert disable["started"] >= enable["ended"]  # one job per target at a time, in order
    with pytest.raises(ApiCallError) as e:
        await api.get("/api/v1/items/web01")
    assert e.value.status == 404
    # and it can be enabled again
    await wait_job(api, (await _enable(api, "web01"))["id"], step_running("prepare_agent"))


async def test_disable_a_protected_item(cs: ConfigServer, api: ApiClient, tmp_path: Path
                                        ) -> None:
    agent = await _setup(cs, api, tmp_path)
    job = await _enable(api, "web01")
    async with agent:
        await agent.heartbeat()
        await agent.progress({"sda": 100, "sdb": 100})
        await report_point(cs.url, cs.internal_token, "web01", P1)
        await wait_job(api, job["id"])
        await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
        with pytest.raises(ApiCallError) as e:
            await _enable(api, "web01")
        assert (e.value.status, e.value.api_code) == (409, "already_protected")
        disable = (await api.post("/api/v1/replication/disable", {"machine": "web01"}))["job"]
        with pytest.raises(ApiCallError) as e:
            await api.post(f"/api/v1/jobs/{disable['id']}/cancel")
        assert (e.value.status, e.value.api_code) == (409, "not_cancellable")
        disable = await wait_job(api, disable["id"])
        assert disable["state"] == "succeeded"
        assert [s["state"] for s in disable["steps"]] == ["succeeded", "succeeded"]
        status, settings = await agent.settings()
        assert status == 200 and settings["replicate"] is False
        assert settings["item_state"] is None and settings["policy"] is None
    assert (await api.get("/api/v1/items"))["items"] == []
    assert [p["id"] for p in (await api.get("/api/v1/points"))["points"]] == [P1]
