"""Recovery plans through the real configuration server (SQLite and PostgreSQL), a real
vault with real points and the folder target: a plan of three items in two groups, with
a script and a manual action, run as a drill (and its cleanup) and as a failover (and its
commit) — each recovered disk byte-exact; a failing script stops its plan; a manual
action resumed from the CLI; every refusal of bad input."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from configserver.config import ConfigServerConfig
from configserver.planscripts import TAIL_BYTES, run_script
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from siterecovery.cli import main
from tests.helpers import make_vault, open_vault, sha256, write_full_point
from tests.sitehelpers import (
    AgentSite,
    add_machine,
    add_procserver,
    next_job,
    report_point,
    step,
    wait_job,
)
from vault.regkey import make_key

DISK = (1 << 20) + 5120  # a short last block (disks are whole 512-byte sectors)
GROUP1, GROUP2 = ["web01", "web02"], ["db01"]


def _disk() -> bytes:
    """Random content behind an empty MBR (the disk check finds a table, no partition)."""
    d = bytearray(os.urandom(DISK))
    d[446:512] = bytes(64) + b"\x55\xaa"
    return bytes(d)


async def _protect(cs: ConfigServer, api: ApiClient, tmp: Path,
                   machines: list[str] = GROUP1 + GROUP2) -> dict[str, tuple[str, str]]:
    """Register a vault; protect ``machines`` through the real jobs with one full point
    each; machine -> (point id, the disk's sha256)."""
    url, key = await make_vault(tmp)
    vault = await open_vault(tmp / "vault", key)
    out: dict[str, tuple[str, str]] = {}
    try:
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
        await add_procserver(cs.url, cs.internal_token)
        for m in machines:
            await add_machine(api, m, disks=("sda",))
            agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, m, cs.passphrase,
                                           tmp / "agent")
            jid = (await api.post("/api/v1/replication/enable", {"machine": m}))["job"]["id"]
            async with agent:
                assert (await agent.heartbeat("2.0.0"))[0] == 200
                assert (await agent.progress({"sda": 100}))[0] == 200
            data = _disk()
            p = await write_full_point(vault, data, machine=m, cycle="c1")
            await report_point(cs.url, cs.internal_token, m, p.id, p.created, p.consistency)
            out[m] = (p.id, hashlib.sha256(data).hexdigest())
            assert (await wait_job(api, jid))["state"] == "succeeded"
        for m in out:
            fin = await wait_job(api, (await next_job(api, m, "finalize_protection"))["id"])
            assert fin["state"] == "succeeded", fin
    finally:
        await vault.close()
    return out


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


async def _cli(cs: ConfigServer, capsys: pytest.CaptureFixture[str], *args: str
               ) -> tuple[int, str]:
    """The CLI run in-process (in a thread: it has its own event loop); its exit status
    and standard error (its standard output shares the server's logs)."""
    capsys.readouterr()
    saved = structlog.get_config()  # the CLI configures logging onto the captured stdout
    try:
        rc = await asyncio.to_thread(main, [*args, "--api", cs.url, "--token-file",
                                            str(cs.cfg.token_path)])
    finally:
        structlog.configure(**saved)  # the server's logs never go into a closed capture
    return rc, capsys.readouterr().err


async def _run(cs: ConfigServer, api: ApiClient, verb: str, body: dict[str, Any],
               capsys: pytest.CaptureFixture[str] | None = None) -> dict[str, Any]:
    """Run a plan verb; confirm its manual action when it waits at it (from the CLI with
    ``capsys``, else through the REST API)."""
    job = (await api.post(f"/api/v1/plans/dr/{verb}", body))["job"]
    assert job["kind"] == "plan_" + verb.replace("-", "_")
    job = await wait_job(api, job["id"], lambda j: j["state"] in (
        "waiting", "succeeded", "failed", "cancelled"))
    assert job["state"] == "waiting", job
    act = step(job, "g1_post_action")
    assert act["state"] == "running" and "check the web tier" in act["message"]
    assert f"siterecovery jobs resume {job['id']}" in act["message"]
    # group 2 has not started while group 1's action waits
    assert step(job, "g2_start")["state"] == "pending"
    for m in GROUP1:
        assert step(job, f"item_{m}")["state"] == "succeeded"
    if capsys is not None:
        rc, err = await _cli(cs, capsys, "jobs", "resume", job["id"], "--notes",
                             "web tier answers")
        assert rc == 0, err
    else:
        done = await api.post(f"/api/v1/jobs/{job['id']}/resume",
                              {"notes": "web tier answers"})
        assert done["id"] == job["id"]  # as it is: the engine goes on at its next tick
    return await wait_job(api, job["id"])


def _recovered(cs: ConfigServer, points: dict[str, tuple[str, str]]) -> None:
    for m, (_, digest) in points.items():
        folder = Path(cs.cfg.data_dir) / "recovered" / m
        assert sha256(folder / "sda.img") == digest, m
        assert json.loads((folder / "vm.json").read_text())["point"] == points[m][0]


async def test_a_plan_drills_and_fails_over_three_items_in_two_groups(
        cs: ConfigServer, api: ApiClient, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    points = await _protect(cs, api, tmp_path)
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    pre = _script(tmp_path / "pre.sh", f"env | grep ^SITERECOVERY_ | sort > "
                  f"{env_dir}/$SITERECOVERY_PLAN_OPERATION\necho web tier prepared\n"
                  "echo to stderr >&2\n")
    failing = _script(tmp_path / "fail.sh", "echo database not ready\nexit 3\n")

    # a plan whose first script fails: nothing of it runs
    await api.post("/api/v1/plans", {"name": "broken", "groups": [
        {"items": GROUP1, "pre_script": {"path": failing}}, {"items": GROUP2}]})
    job = (await api.post("/api/v1/plans/broken/test-failover", {}))["job"]
    job = await wait_job(api, job["id"])
    assert job["state"] == "failed"
    assert job["error"] == f"group1: pre script: the pre script {failing} failed (exit " \
                           "status 3); its output: database not ready"
    assert all(s["state"] == "skipped" for s in job["steps"][1:])
    for m in points:
        assert (await api.get("/api/v1/items/" + m))["state"] == "protected"
        assert (await api.get("/api/v1/jobs", target=m, kind="test_failover"))["jobs"] == []

    rc, err = await _cli(cs, capsys, "plan", "create", "dr", "--group", ",".join(GROUP1),
                         "--group", GROUP2[0], "--pre-script", f"1={pre}", "--post-action",
                         "1=check the web tier", "--description", "web then database")
    assert rc == 0, err
    plan = await api.get("/api/v1/plans/dr")
    assert plan["items"] == 3 and [g["name"] for g in plan["groups"]] == ["group1", "group2"]
    assert plan["groups"][0]["pre_script"] == {"path": pre, "args": [],
                                               "timeout_seconds": 600}

    drill = await _run(cs, api, "test-failover", {}, capsys)
    assert drill["state"] == "succeeded", drill
    # The items' jobs chose their points through one cache of the vault's manifests.
    vault = await open_vault(tmp_path / "vault", tmp_path / "vault.key")
    try:
        shared = cs.manifests.of(f"{vault.store.url}#{vault.config.vault_id}")
    finally:
        await vault.close()
    assert {name: p.id for name, (_v, p) in shared.items()} == {
        f"points/{pid}": pid for pid, _ in points.values()}
    assert [s["name"] for s in drill["steps"]] == [
        "g1_pre_script", "g1_start", "item_web01", "item_web02", "g1_post_action",
        "g2_start", "item_db01"]
    assert step(drill, "g1_pre_script")["message"] == \
        f"{pre} exited 0; its output: web tier prepared\nto stderr"
    assert "notes: web tier answers" in step(drill, "g1_post_action")["message"]
    for m, (pid, _) in points.items():
        msg = step(drill, f"item_{m}")["message"]
        assert msg.startswith(f"Test failover of {m} succeeded (job ") and f"point {pid}" in msg
        item = await api.get("/api/v1/items/" + m)
        assert item["state"] == "test_failover_done" and item["last_drill"]["point"] == pid
        [child] = (await api.get("/api/v1/jobs", target=m, kind="test_failover"))["jobs"]
        assert child["params"]["plan_job"] == drill["id"]
    _recovered(cs, points)
    env = (env_dir / "test-failover").read_text().splitlines()
    assert env == ["SITERECOVERY_JOB=" + drill["id"], "SITERECOVERY_PLAN=dr",
                   "SITERECOVERY_PLAN_GROUP=group1", "SITERECOVERY_PLAN_ITEMS=web01 web02",
                   "SITERECOVERY_PLAN_OPERATION=test-failover", "SITERECOVERY_PLAN_PHASE=pre"]
    shown = await api.get("/api/v1/plans/dr")
    assert shown["last_job"] == {"id": drill["id"], "kind": "plan_test_failover",
                                 "state": "succeeded"}
    listed = (await api.get("/api/v1/jobs", target="plan:dr"))["jobs"]
    assert [j["id"] for j in listed] == [drill["id"]]  # the plan's jobs, by its target

    # a second drill is refused while the first is not cleaned up, naming each item
    with pytest.raises(ApiCallError) as e:
        await api.post("/api/v1/plans/dr/test-failover", {})
    assert e.value.status == 409 and e.value.api_code == "plan_not_allowed"
    assert "web01: test_failover_done" in e.value.message and "db01" in e.value.message

    cleanup = await _run(cs, api, "cleanup-test-failover", {"notes": "all three came up"})
    assert cleanup["state"] == "succeeded", cleanup
    for m in points:
        item = await api.get("/api/v1/items/" + m)
        assert item["state"] == "protected"
        assert item["last_drill"]["notes"] == "all three came up"
        assert not (Path(cs.cfg.data_dir) / "recovered" / m).exists()

    # a failing item stops the plan, naming it; run again, the plan passes by the items
    # failed over already
    await api.call("PATCH", "/api/v1/items/db01/recovery", {"target": "libvirt"}, {})
    failed = await _run(cs, api, "failover", {})
    assert failed["state"] == "failed" and not failed["cancellable"]
    assert failed["error"].startswith("group2: db01: the Failover job "), failed["error"]
    assert " of db01 failed: Prerequisites check: " in failed["error"]
    assert "recovery target 'libvirt' is not available" in failed["error"]
    assert (await api.get("/api/v1/items/db01"))["state"] == "protected"
    await api.call("PATCH", "/api/v1/items/db01/recovery", {"target": None}, {})
    failover = await _run(cs, api, "failover", {})
    assert failover["state"] == "succeeded", failover
    for m in GROUP1:
        assert step(failover, f"item_{m}")["message"] == \
            f"{m} passed by: it is failed_over already"
        assert f"point {points[m][0]}" in step(failed, f"item_{m}")["message"]
    assert f"point {points['db01'][0]}" in step(failover, "item_db01")["message"]
    for m, (pid, _) in points.items():
        item = await api.get("/api/v1/items/" + m)
        assert item["state"] == "failed_over" and item["failover"]["point"] == pid
    _recovered(cs, points)
    assert (env_dir / "failover").is_file()

    # the plan changed (no manual action now): the commit, followed by the CLI to its end
    await api.call("PATCH", "/api/v1/plans/dr", {"groups": [{"items": GROUP1},
                                                           {"items": GROUP2}]}, {})
    # --timeout counts the clock, not long polls: the job changes more often than 60 s / 30 s
    rc, err = await _cli(cs, capsys, "plan", "commit", "dr", "--wait", "--timeout", "60")
    assert rc == 0, err
    assert "group2: db01: succeeded Commit of db01 succeeded (job " in err  # followed
    commit = await api.get(f"/api/v1/jobs/{(await api.get('/api/v1/plans/dr'))['last_job']['id']}")
    assert commit["kind"] == "plan_commit" and commit["state"] == "succeeded", commit
    assert [s["name"] for s in commit["steps"]] == [
        "g1_start", "item_web01", "item_web02", "g2_start", "item_db01"]
    for m in points:
        assert (await api.get("/api/v1/items/" + m))["state"] == "committed"
    _recovered(cs, points)  # a commit keeps the failed-over machines


async def test_bad_input_and_resume_refusals(cs: ConfigServer, api: ApiClient,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    await add_procserver(cs.url, cs.internal_token)
    for m in ("web01", "db01"):
        await add_machine(api, m, disks=("sda",))
        await api.post("/api/v1/replication/enable", {"machine": m})

    async def refused(body: dict[str, Any], status: int, code: str) -> str:
        with pytest.raises(ApiCallError) as e:
            await api.post("/api/v1/plans", body)
        assert (e.value.status, e.value.api_code) == (status, code), e.value
        return e.value.message

    msg = await refused({"name": "p", "groups": [{"items": ["web01", "nope"]}]}, 422,
                        "plan_item_unknown")
    assert msg == "plan 'p': nope is not replicated"
    many = [{"items": [f"m{g}-{i}" for i in range(50)]} for g in range(2)] + \
        [{"items": ["web01"]}]
    msg = await refused({"name": "p", "groups": many}, 422, "plan_too_large")
    assert "101 items; a plan holds at most 100" in msg
    await refused({"name": "p", "groups": [{"items": ["web01"]}, {"items": ["web01"]}]},
                  422, "plan_item_repeated")
    await refused({"name": "p", "groups": [{"items": ["web01"],
                                            "pre_script": {"path": str(tmp_path)}}]},
                  422, "plan_script_invalid")
    await refused({"name": "p", "groups": []}, 422, "invalid_request")
    assert (await api.get("/api/v1/plans"))["plans"] == []  # nothing was written

    await api.post("/api/v1/plans", {"name": "p", "groups": [{"items": ["web01"]}]})
    await refused({"name": "p", "groups": [{"items": ["db01"]}]}, 409, "plan_exists")
    doc = await api.call("PATCH", "/api/v1/plans/p", {"groups": [
        {"items": ["db01"], "name": "db"}, {"items": ["web01"], "name": "web"}]}, {})
    assert [g["items"] for g in doc["groups"]] == [["db01"], ["web01"]]

    rc, err = await _cli(cs, capsys, "plan", "create", "p", "--group", "web01")
    assert rc == 2 and "a recovery plan named 'p' exists" in err
    rc, err = await _cli(cs, capsys, "plan", "create", "q", "--group", "web01,ghost")
    assert rc == 2 and "ghost is not replicated" in err
    rc, err = await _cli(cs, capsys, "plan", "test-failover", "nope")
    assert rc == 2 and "no recovery plan named 'nope'" in err
    rc, err = await _cli(cs, capsys, "plan", "create", "q", "--pre-action", "1=x")
    assert rc == 2 and "--pre-action needs the groups" in err
    # items still enabling: the plan is refused before any job is queued
    with pytest.raises(ApiCallError) as e:
        await api.post("/api/v1/plans/p/failover", {})
    assert e.value.status == 409 and e.value.api_code == "plan_not_allowed"

    job = (await api.get("/api/v1/jobs", target="web01"))["jobs"][0]
    with pytest.raises(ApiCallError) as e:
        await api.post(f"/api/v1/jobs/{job['id']}/resume", {})
    assert e.value.status == 409 and e.value.api_code == "job_not_waiting"
    rc, err = await _cli(cs, capsys, "jobs", "resume", "01234567-89ab-7def-8123-456789abcdef")
    assert rc == 2 and "no job with id" in err

    plan_file = tmp_path / "p.json"
    plan_file.write_text(json.dumps({"description": "from a file", "groups": [
        {"items": ["web01", "db01"], "post_action": "call the DBA"}]}))
    rc, err = await _cli(cs, capsys, "plan", "update", "p", "--file", str(plan_file))
    assert rc == 0, err
    doc = await api.get("/api/v1/plans/p")
    assert (doc["description"], doc["items"]) == ("from a file", 2)
    assert doc["groups"][0]["post_action"] == "call the DBA"
    for verb in ("list", "show"):
        rc, err = await _cli(cs, capsys, "plan", verb, *(["p"] if verb == "show" else []))
        assert rc == 0, err
    assert (await api.call("DELETE", "/api/v1/plans/p", None, {}))["deleted"] == "p"
    with pytest.raises(ApiCallError) as e:
        await api.get("/api/v1/plans/p")
    assert e.value.status == 404 and e.value.api_code == "plan_not_found"


async def test_a_job_waiting_at_a_manual_action_waits_again_after_a_restart(
        tmp_path: Path, catalog_url: str) -> None:
    """The waiting state is durable: a configuration server stopped while a plan job waits
    resumes the job at its manual action, which still needs the operator; then the plan
    goes on and the item is recovered byte-exact."""
    cfg = ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0,
                             database_url=catalog_url)
    server = ConfigServer(cfg)
    await server.start()
    try:
        async with ApiClient(server.url, server.admin_token) as api:
            points = await _protect(server, api, tmp_path, machines=["web01"])
            await api.post("/api/v1/plans", {"name": "dr", "groups": [
                {"items": ["web01"], "pre_action": "stop the batch jobs"}]})
            job = (await api.post("/api/v1/plans/dr/test-failover", {}))["job"]
            job = await wait_job(api, job["id"], lambda j: j["state"] == "waiting")
            assert step(job, "g1_pre_action")["state"] == "running"
    finally:
        await server.stop()
    server = ConfigServer(cfg)
    await server.start()
    try:
        async with ApiClient(server.url, server.admin_token) as api:
            job = await wait_job(api, job["id"], lambda j: j["attempts"] == 2 and
                                 j["state"] == "waiting")
            assert step(job, "g1_pre_action")["attempts"] == 2
            assert step(job, "g1_start")["state"] == "pending"  # nothing went on by itself
            await api.post(f"/api/v1/jobs/{job['id']}/resume", {})
            job = await wait_job(api, job["id"])
            assert job["state"] == "succeeded", job
            assert f"point {points['web01'][0]}" in step(job, "item_web01")["message"]
            _recovered(server, points)
            with pytest.raises(ApiCallError) as e:  # it waits for nothing any more
                await api.post(f"/api/v1/jobs/{job['id']}/resume", {})
            assert e.value.status == 409 and e.value.api_code == "job_not_waiting"
            # a waiting drill cleanup can be cancelled: it ends before any item's job
            job = (await api.post("/api/v1/plans/dr/cleanup-test-failover",
                                  {"notes": "n"}))["job"]
            job = await wait_job(api, job["id"], lambda j: j["state"] == "waiting")
            assert job["cancellable"]
            job = await api.post(f"/api/v1/jobs/{job['id']}/cancel", {})
            assert job["state"] == "cancelled"
            assert step(job, "g1_pre_action")["message"] == "cancelled by the operator"
            assert (await api.get("/api/v1/items/web01"))["state"] == "test_failover_done"
    finally:
        await server.stop()


async def test_a_script_is_killed_at_its_timeout_with_its_children_and_keeps_a_tail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITERECOVERY_TEST_SECRET", "not for scripts")
    loud = _script(tmp_path / "loud.sh", "env\nyes x | head -c 100000\n"
                                         "echo; echo last line\n")
    r = await run_script(loud, [], {"SITERECOVERY_PLAN": "dr"}, 30)
    assert r.status == 0 and r.output.endswith("x\nx\n\nlast line")
    assert len(r.output) <= TAIL_BYTES  # what it printed first is gone, memory bounded
    r = await run_script(_script(tmp_path / "env.sh", "env\n"), [], {"A": "1"}, 30)
    assert "A=1" in r.output.splitlines() and "SITERECOVERY_TEST_SECRET" not in r.output
    hang = _script(tmp_path / "hang.sh", "sleep 300 &\necho started\nwait\n")
    started = time.monotonic()
    r = await run_script(hang, [], {}, 1)
    assert r.status is None and r.output == "started"
    assert time.monotonic() - started < 30  # the background sleep was killed with it
