"""A consistency group drilled and failed over to one group point, through the real
configuration server (SQLite and PostgreSQL), a real vault with real points and the folder
target: each member recovers its own point of the group point (not its newest), byte for
byte, in one job with a step per member; cleanup and commit likewise; refusals without a
complete group point; a group left as it is while a job of it runs."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import open_vault, sha256, write_full_point
from tests.sitehelpers import step, step_running, wait_job
from tests.test_console_http import _browser, _sign_in
from tests.test_recovery_plans import DISK, _cli, _protect
from vault.locks import acquire

MEMBERS = ["app01", "db01"]


def _disk() -> bytes:
    d = bytearray(os.urandom(DISK))
    d[446:512] = bytes(64) + b"\x55\xaa"
    return bytes(d)


async def _points(cs: ConfigServer, tmp: Path) -> dict[str, tuple[str, str, str]]:
    """A full point of each member, reported as a process server reports it (its cycle in
    the manifest); machine -> (point id, cycle, the disk's sha256)."""
    out = {}
    vault = await open_vault(tmp / "vault", tmp / "vault.key")
    try:
        for m in MEMBERS:
            data, cycle = _disk(), uuid.uuid4().hex
            p = await write_full_point(vault, data, machine=m, cycle=cycle)
            async with ApiClient(cs.url, cs.internal_token) as internal:
                await internal.post("/api/v1/internal/points", p.to_json())
            out[m] = (p.id, cycle, hashlib.sha256(data).hexdigest())
    finally:
        await vault.close()
    return out


async def _released(cs: ConfigServer, at: dict[str, tuple[str, str, str]]) -> str:
    """A group point of erp released on the members' cycles of ``at``, as its process
    server reports it; its id."""
    gp = uuid.uuid4().hex
    async with ApiClient(cs.url, cs.internal_token) as internal:
        await internal.post("/api/v1/internal/group-points", {
            "id": gp, "group": "erp", "created": 1.8e9, "state": "released",
            "members": {m: c for m, (_, c, _) in at.items()}})
    return gp


async def test_a_group_drills_and_fails_over_to_one_group_point(
        cs: ConfigServer, api: ApiClient, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    await _protect(cs, api, tmp_path, MEMBERS)
    assert (tmp_path / "vault.key").exists()
    await api.post("/api/v1/groups", {"name": "erp", "members": MEMBERS})
    with pytest.raises(ApiCallError) as e:
        await api.post("/api/v1/groups/erp/test-failover", {})
    assert (e.value.status, e.value.api_code) == (409, "no_group_point")
    at_group = await _points(cs, tmp_path)
    gp = await _released(cs, at_group)
    newer = await _points(cs, tmp_path)  # each member's own points go on after it
    assert (await api.get(f"/api/v1/groups/erp/points/{gp}"))["state"] == "complete"

    rc, err = await _cli(cs, capsys, "group", "test-failover", "erp", "--wait")
    assert rc == 0, err
    shown = await api.get("/api/v1/groups/erp")
    assert shown["job_target"] == "group:erp"
    drill = await api.get("/api/v1/jobs/" + shown["last_job"]["id"])
    listed = (await api.get("/api/v1/jobs", target="group:erp"))["jobs"]
    assert [j["id"] for j in listed] == [drill["id"]]  # the group's jobs, by its target
    assert drill["kind"] == "plan_test_failover" and drill["state"] == "succeeded", drill
    assert [s["name"] for s in drill["steps"]] == ["g1_start", "item_app01", "item_db01"]
    for m, (pid, _, digest) in at_group.items():
        assert f"point {pid}" in step(drill, f"item_{m}")["message"]
        assert newer[m][0] != pid
        folder = Path(cs.cfg.data_dir) / "recovered" / m
        assert sha256(folder / "sda.img") == digest, m
        assert json.loads((folder / "vm.json").read_text())["point"] == pid
        assert (await api.get("/api/v1/items/" + m))["last_drill"]["point"] == pid

    cleanup = (await api.post("/api/v1/groups/erp/cleanup-test-failover",
                              {"notes": "both came up, the links hold"}))["job"]
    assert (await wait_job(api, cleanup["id"]))["state"] == "succeeded"
    started = await api.post("/api/v1/groups/erp/failover", {"group_point": gp})
    assert started["group_point"] == gp
    job = await wait_job(api, started["job"]["id"])
    assert job["state"] == "succeeded", job
    for m, (pid, _, digest) in at_group.items():
        item = await api.get("/api/v1/items/" + m)
        assert item["state"] == "failed_over" and item["failover"]["point"] == pid
        assert sha256(Path(cs.cfg.data_dir) / "recovered" / m / "sda.img") == digest
    commit = (await api.post("/api/v1/groups/erp/commit", {}))["job"]
    assert (await wait_job(api, commit["id"]))["state"] == "succeeded"
    for m in MEMBERS:
        assert (await api.get("/api/v1/items/" + m))["state"] == "committed"


async def test_a_group_point_that_failed_cannot_be_recovered_to(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    await _protect(cs, api, tmp_path, MEMBERS)
    await api.post("/api/v1/groups", {"name": "erp", "members": MEMBERS})
    bad = uuid.uuid4().hex
    async with ApiClient(cs.url, cs.internal_token) as internal:
        await internal.post("/api/v1/internal/group-points", {
            "id": bad, "group": "erp", "created": 1.8e9, "state": "failed",
            "members": {"app01": uuid.uuid4().hex, "db01": None},
            "error": "db01 did not reach the barrier (ready) within 60 s"})
    for body, status, code in (({"group_point": bad}, 409, "group_point_not_complete"),
                               ({"group_point": uuid.uuid4().hex}, 404,
                                "group_point_not_found"),
                               ({}, 409, "no_group_point")):
        with pytest.raises(ApiCallError) as e:
            await api.post("/api/v1/groups/erp/failover", body)
        assert (e.value.status, e.value.api_code) == (status, code), e.value
        assert e.value.hint
    assert (await api.get("/api/v1/groups/erp"))["last_job"] is None
    for m in MEMBERS:
        assert (await api.get("/api/v1/items/" + m))["state"] == "protected"


async def test_a_group_is_left_as_it_is_while_a_job_of_it_runs(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    """A group failover waits for the vault's lock, held as a prune holds it: while it
    does, the group's members are neither added nor removed and the group is not
    deleted, through the REST API or the console; once it has ended, they are."""
    await _protect(cs, api, tmp_path, [*MEMBERS, "web01"])
    await api.post("/api/v1/groups", {"name": "erp", "members": MEMBERS})
    at_group = await _points(cs, tmp_path)
    gp = await _released(cs, at_group)
    vault = await open_vault(tmp_path / "vault", tmp_path / "vault.key")
    prune = await acquire(vault, "exclusive", "prune (the test's)")
    job = (await api.post("/api/v1/groups/erp/failover", {"group_point": gp}))["job"]
    try:
        await wait_job(api, job["id"], step_running("item_app01"))
        before = (await api.get("/api/v1/groups/erp"))["members"]
        for method, path, body in (
                ("POST", "/api/v1/groups/erp/members", {"machines": ["web01"]}),
                ("DELETE", "/api/v1/groups/erp/members/db01", None),
                ("DELETE", "/api/v1/groups/erp", None)):
            with pytest.raises(ApiCallError) as e:
                await api.call(method, path, body, {})
            assert (e.value.status, e.value.api_code) == (409, "group_job_running"), e.value
            assert "--target group:erp --active" in e.value.hint
        async with _browser() as http:
            csrf = await _sign_in(http, cs)
            async with http.get(cs.url + "/console/groups/erp") as r:
                page = await r.text()
            assert "queued or running" in page and f"/console/jobs/{job['id']}" in page
            for action in ("members/add", "members/remove", "delete"):
                assert f"/console/groups/erp/{action}" not in page, action
            async with http.post(cs.url + "/console/groups/erp/members/remove",
                                 data={"csrf": csrf, "machine": "db01"}) as r:
                assert r.status == 409 and "is queued or running" in await r.text()
        # the refusals changed nothing (its group point settles meanwhile, on its own)
        assert (await api.get("/api/v1/groups/erp"))["members"] == before == MEMBERS
    finally:
        await prune.release()
        await vault.close()
    assert (await wait_job(api, job["id"]))["state"] == "succeeded"
    g = await api.call("DELETE", "/api/v1/groups/erp/members/db01", None, {})
    assert g["members"] == ["app01"]
    assert (await api.call("DELETE", "/api/v1/groups/erp", None, {})) == {"deleted": "erp"}
