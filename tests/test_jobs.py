"""The durable job engine through the real APIs and CLI (SQLite and PostgreSQL): a
configuration server killed with kill -9 in the middle of a job resumes it; cancel;
concurrency per target; timeouts; list filters; ``jobs``/``items``/``replication`` verbs."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.csclock import Clock, clocked_configserver
from tests.helpers import Daemon, run_cli, write_toml
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

P1 = "1" * 64


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cs(tmp_path: Path, catalog_url: str, clock: Clock) -> AsyncIterator[ConfigServer]:
    """The configuration server of every test here runs on ``clock`` (SQLite, PostgreSQL)."""
    async with clocked_configserver(tmp_path / "cs", catalog_url, clock) as server:
        yield server


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


async def _metric(url: str, name: str, labels: dict[str, str]) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_kill9_in_the_middle_of_a_job_resumes_it(tmp_path: Path, catalog_url: str
                                                       ) -> None:
    data = tmp_path / "cs"
    config = write_toml(tmp_path / "configserver.toml", {
        "data_dir": str(data), "listen_port": 0, "site_port": 0, "database_url": catalog_url})
    args = ["configserver", "run", "--config", str(config)]
    first = Daemon(args, "configserver_started")
    ready = await first.start()
    url, site = f"http://127.0.0.1:{ready['port']}", f"https://127.0.0.1:{ready['site_port']}"
    token = (data / "api-token").read_text().strip()
    internal = (data / "internal-token").read_text().strip()
    ca = data / "ca" / "ca.pem"
    second: Daemon | None = None
    try:
        async with ApiClient(url, token) as api:
            await add_procserver(url, internal)
            await add_machine(api, "web01")
            agent = await AgentSite.enroll(site, ca, "web01",
                                           (data / "enrollment-passphrase").read_text().strip(),
                                           tmp_path / "agent")
            jid = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]["id"]
            async with agent:
                assert (await agent.heartbeat("2.0.0"))[0] == 200
                started = await first.wait_events("job_step_started", 3)
                assert [e["step"] for e in started] == ["validate", "prepare_agent",
                                                        "initial_replication"]
                assert (await agent.progress({"sda": 100, "sdb": 40}))[0] == 200
            before = await wait_job(api, jid, lambda j: step(j, "initial_replication")[
                "progress"] == 70.0)
        await first.kill9()
        assert first.events("job_succeeded") == []

        second = Daemon(args, "configserver_started")
        ready = await second.start()
        url, site = f"http://127.0.0.1:{ready['port']}", f"https://127.0.0.1:{ready['site_port']}"
        (resumed,) = await second.wait_events("job_resumed", 1)
        assert (resumed["job"], resumed["attempts"]) == (jid, 2)
        (again,) = await second.wait_events("job_step_started", 1)
        assert (again["step"], again["attempt"]) == ("initial_replication", 2)
        async with ApiClient(url, token) as api:
            during = await api.get(f"/api/v1/jobs/{jid}")
            assert during["state"] == "running" and during["attempts"] == 2
            async with AgentSite(site, ca, agent.cert, agent.key) as agent2:
                item = (await agent2.progress({"sdb": 100}))[1]
                assert item["initial_progress"] == 100.0
            await report_point(url, internal, "web01", P1, _now_iso())
            done = await wait_job(api, jid)
            assert done["state"] == "succeeded" and done["attempts"] == 2, done
            for name in ("validate", "prepare_agent"):  # done before the kill: untouched
                assert step(done, name) == step(before, name)
                assert step(done, name)["attempts"] == 1
            ir, ir_before = step(done, "initial_replication"), step(before, "initial_replication")
            assert ir["state"] == "succeeded" and ir["attempts"] == 2
            assert ir["started"] == ir_before["started"] and ir["ended"] is not None
            assert done["created"] == before["created"] and done["started"] == before["started"]
            fin = await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
            assert fin["state"] == "succeeded" and fin["attempts"] == 1
            item = await api.get("/api/v1/items/web01")
            assert item["state"] == "protected" and item["latest_point"] == P1
        assert await _metric(url, "siterecovery_configserver_jobs_resumed_total",
                             {"kind": "enable_protection"}) == 1.0
        assert await _metric(url, "siterecovery_configserver_jobs_total",
                             {"kind": "finalize_protection", "result": "succeeded"}) == 1.0
    finally:
        for d in (first, second):
            if d is not None and d.proc is not None and d.proc.returncode is None:
                await d.stop()


async def _ready(cs: ConfigServer, api: ApiClient, tmp_path: Path, *names: str
                 ) -> dict[str, AgentSite]:
    await add_procserver(cs.url, cs.internal_token)
    agents = {}
    for name in names:
        await add_machine(api, name)
        agents[name] = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, name,
                                              cs.passphrase, tmp_path / "agents")
    return agents


async def _enable(api: ApiClient, name: str) -> str:
    jid: str = (await api.post("/api/v1/replication/enable", {"machine": name}))["job"]["id"]
    return jid


async def test_cancel_a_running_job(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    await _ready(cs, api, tmp_path, "web01")
    jid = await _enable(api, "web01")
    await wait_job(api, jid, step_running("prepare_agent"))
    job = await api.post(f"/api/v1/jobs/{jid}/cancel")
    assert job["state"] == "cancelled" and job["cancellable"] is False
    assert job["error"] == "Prepare the Mobility agent: cancelled by the operator"
    assert [s["state"] for s in job["steps"]] == ["succeeded", "failed", "skipped"]
    item = await api.get("/api/v1/items/web01")
    assert item["state"] == "enable_failed" and item["health_errors"] == [job["error"]]
    assert (await api.get("/api/v1/jobs", active=True))["jobs"] == []

    for path, status, code in (
            (f"/api/v1/jobs/{jid}/cancel", 409, "job_finished"),
            (f"/api/v1/jobs/{uuid.uuid4()}/cancel", 404, "job_not_found"),
            ("/api/v1/jobs/not-a-job/cancel", 404, "not_found")):
        with pytest.raises(ApiCallError) as e:
            await api.post(path)
        assert (e.value.status, e.value.api_code) == (status, code)
    assert await api.get(f"/api/v1/jobs/{jid}") == job  # refusals changed nothing
    assert await _metric(cs.url, "siterecovery_configserver_jobs_total",
                         {"kind": "enable_protection", "result": "cancelled"}) == 1.0


async def test_targets_run_concurrently_and_list_filters(cs: ConfigServer, api: ApiClient,
                                                         tmp_path: Path) -> None:
    agents = await _ready(cs, api, tmp_path, "web01", "db01")
    a, b = await _enable(api, "web01"), await _enable(api, "db01")
    await wait_job(api, a, step_running("prepare_agent"))
    await wait_job(api, b, step_running("prepare_agent"))  # while a waits: not serialized
    assert (await api.get(f"/api/v1/jobs/{a}"))["state"] == "running"

    jobs = (await api.get("/api/v1/jobs"))["jobs"]
    assert [j["id"] for j in jobs] == [b, a]  # newest first
    assert [j["id"] for j in (await api.get("/api/v1/jobs", target="web01"))["jobs"]] == [a]
    assert [j["id"] for j in (await api.get("/api/v1/jobs", limit=1))["jobs"]] == [b]
    assert len((await api.get("/api/v1/jobs", state="running"))["jobs"]) == 2
    assert (await api.get("/api/v1/jobs", kind="disable_protection"))["jobs"] == []
    assert (await api.get("/api/v1/jobs", active=False))["jobs"] == []
    for bad in ({"state": "bogus"}, {"limit": 0}, {"kind": "nosuch"}, {"active": "maybe"}):
        with pytest.raises(ApiCallError) as e:
            await api.get("/api/v1/jobs", **bad)
        assert e.value.status == 400, bad

    async with agents["db01"] as agent:  # db01's agent only: web01 keeps waiting
        await agent.heartbeat()
    await wait_job(api, b, step_running("initial_replication"))
    assert step(await api.get(f"/api/v1/jobs/{a}"), "prepare_agent")["state"] == "running"


async def test_a_step_that_times_out_fails_the_job(cs: ConfigServer, api: ApiClient,
                                                  tmp_path: Path, clock: Clock) -> None:
    await _ready(cs, api, tmp_path, "web01")
    jid = await _enable(api, "web01")
    await wait_job(api, jid, lambda j: step(j, "prepare_agent")["message"].endswith(
                   "waiting for the Mobility agent to check in"))
    start = cs.clock()
    clock.now = start + 3601  # an hour later and the agent never checked in
    await report_point(cs.url, cs.internal_token, "elsewhere", P1)  # any change re-checks
    job = await wait_job(api, jid)
    assert job["state"] == "failed"
    assert job["error"].startswith("Prepare the Mobility agent: timed out after 3600 s waiting "
                                   "for the Mobility agent to check in")


def _cli(cs: ConfigServer, *args: str) -> list[str]:
    return [*args, "--api", cs.url, "--token-file", str(cs.cfg.token_path)]


# The CLI is the same over either catalog (the API tests run on both): SQLite only.
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_cli_enable_wait_items_and_jobs(cs: ConfigServer, api: ApiClient, tmp_path: Path
                                              ) -> None:
    agents = await _ready(cs, api, tmp_path, "web01")
    waiting = asyncio.create_task(asyncio.to_thread(
        run_cli, *_cli(cs, "replication", "enable", "web01", "--wait", "--timeout", "120")))
    jobs: list[dict[str, Any]] = []
    async with asyncio.timeout(60), cs.changed:  # the enable call notifies; held: none missed
        while not (jobs := (await api.get("/api/v1/jobs", target="web01"))["jobs"]):
            await cs.changed.wait()
    jid = jobs[0]["id"]
    await wait_job(api, jid, step_running("prepare_agent"))
    async with agents["web01"] as agent:
        await agent.heartbeat()
        await agent.progress({"sda": 100, "sdb": 100})
    await report_point(cs.url, cs.internal_token, "web01", P1, _now_iso())
    r = await waiting
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Enable protection web01: ")
    assert "Finalize protection web01: succeeded 100%" in lines
    assert lines[-1].startswith("job ") and lines[-1].endswith(" succeeded")

    r = await asyncio.to_thread(run_cli, *_cli(cs, "items", "list"))
    assert r.returncode == 0 and r.stdout.split("\n")[1].split()[:3] == \
        ["web01", "protected", "normal"]
    r = await asyncio.to_thread(run_cli, *_cli(cs, "items", "show", "web01", "--json"))
    assert json.loads(r.stdout)["latest_point"] == P1
    r = await asyncio.to_thread(run_cli, *_cli(cs, "jobs", "list", "--target", "web01"))
    assert r.returncode == 0 and "Finalize protection" in r.stdout and jid in r.stdout
    r = await asyncio.to_thread(run_cli, *_cli(cs, "jobs", "show", jid))
    assert r.returncode == 0 and "Initial replication" in r.stdout and "attempts 1" in r.stdout
    r = await asyncio.to_thread(run_cli, *_cli(cs, "jobs", "wait", jid, "--json"))
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "succeeded"

    r = await asyncio.to_thread(run_cli, *_cli(cs, "replication", "disable", "web01", "--wait"))
    assert r.returncode == 0, r.stderr
    assert "Disable protection web01: succeeded 100%" in r.stdout.splitlines()
    r = await asyncio.to_thread(run_cli, *_cli(cs, "items", "list"))
    assert r.stdout.strip() == "(none)"


async def test_cli_errors_and_failed_jobs(cs: ConfigServer, api: ApiClient) -> None:
    await add_machine(api, "web01")  # no process server: Enable protection fails
    r = await asyncio.to_thread(run_cli, *_cli(cs, "replication", "enable", "web01", "--wait"))
    assert r.returncode == 1
    assert "Prerequisites check: no process server is registered" in r.stderr
    jid = (await api.get("/api/v1/jobs"))["jobs"][0]["id"]
    r = await asyncio.to_thread(run_cli, *_cli(cs, "jobs", "wait", jid))
    assert r.returncode == 1 and f"job {jid} failed" in r.stderr
    r = await asyncio.to_thread(run_cli, *_cli(cs, "replication", "enable", "nosuch"))
    assert r.returncode == 2 and "no machine named 'nosuch'" in r.stderr
    r = await asyncio.to_thread(run_cli, *_cli(cs, "jobs", "show", str(uuid.uuid4())))
    assert r.returncode == 2 and "no job with id" in r.stderr
    r = await asyncio.to_thread(run_cli, *_cli(cs, "jobs", "cancel", jid))
    assert r.returncode == 2 and "already ended (failed)" in r.stderr
    assert [j["id"] for j in (await api.get("/api/v1/jobs"))["jobs"]] == [jid]


async def test_a_cancel_while_a_step_starts_is_not_missed(cs: ConfigServer, api: ApiClient,
                                                         tmp_path: Path) -> None:
    """A cancel that comes while the engine saves a step as running (the step shows as
    running; its task is not made yet) cancels that step: it used to run to its end (here:
    waiting for an agent that never checks in) with the cancel call waiting for it."""
    await _ready(cs, api, tmp_path, "web01")
    jobs = cs.services.jobs
    save = jobs.save
    cancelled: list[asyncio.Task[None]] = []
    asked = asyncio.Event()

    async def save_then_cancel(job: Any, expect: tuple[str, ...], extra: Any = None) -> int:
        n = await save(job, expect, extra)
        if not cancelled and step({"steps": job.steps}, "prepare_agent")["state"] == "running":
            # the interleaving: a cancel arrives here, before the step's task exists
            cancelled.append(asyncio.create_task(jobs.cancel(job.id)))
            asked.set()
            async with asyncio.timeout(30):
                # until the cancel has asked (it reads the job first): no event to wait on
                while not jobs._running[job.id].cancel_requested:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        return n

    jobs.save = save_then_cancel  # type: ignore[method-assign]
    jid = await _enable(api, "web01")
    async with asyncio.timeout(30):
        await asked.wait()
        await cancelled[0]  # returns once the job is cancelled
    job = await api.get(f"/api/v1/jobs/{jid}")
    assert job["state"] == "cancelled", job
    assert step(job, "prepare_agent")["message"] == "cancelled by the operator"
