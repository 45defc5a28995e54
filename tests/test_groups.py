"""Consistency groups in the catalog, through the real configuration server (SQLite and
PostgreSQL) and the CLI: create, add, remove, show, list, delete; every refusal (a machine
in two groups, an unknown machine, members on different process servers) names what is
wrong, hints what to do and changes nothing; group points as a process server reports
them, complete once every member's point is in the catalog, a failed one with its event."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
import structlog

from configserver import groupsettle
from configserver.core import Core
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from siterecovery.cli import main
from tests.sitehelpers import add_procserver


async def _machine(api: ApiClient, name: str, ps: str | None = "ps1") -> None:
    await api.post("/api/v1/machines", {
        "name": name, "ip": "192.0.2.10", "os_type": "linux", "os_name": "ubuntu",
        "os_version": "22.04", "process_server": ps,
        "disks": [{"name": "sda", "path": "/dev/sda", "size_bytes": 1 << 30}]})


async def _site(cs: ConfigServer, api: ApiClient) -> None:
    await add_procserver(cs.url, cs.internal_token, "ps1", "127.0.0.1:9443")
    await add_procserver(cs.url, cs.internal_token, "ps2", "127.0.0.2:9443")
    for m in ("app01", "db01", "web01"):
        await _machine(api, m)
    await _machine(api, "far01", "ps2")
    await _machine(api, "loose01", None)


async def _refused(api: ApiClient, method: str, path: str, body: Any, status: int,
                   code: str) -> str:
    before = await api.get("/api/v1/groups")
    with pytest.raises(ApiCallError) as e:
        await api.call(method, path, body, {})
    assert (e.value.status, e.value.api_code) == (status, code), e.value
    assert e.value.hint, e.value
    assert await api.get("/api/v1/groups") == before  # changed nothing
    return str(e.value)


async def test_groups_catalog_and_refusals(cs: ConfigServer, api: ApiClient) -> None:
    await _site(cs, api)
    g = await api.post("/api/v1/groups", {"name": "erp", "members": ["app01", "db01"],
                                          "interval_seconds": 600,
                                          "barrier_timeout_seconds": 30})
    assert g["members"] == ["app01", "db01"] and g["process_server"] == "ps1"
    assert (g["interval_seconds"], g["barrier_timeout_seconds"]) == (600, 30)
    assert g["last_point"] is None
    msg = await _refused(api, "POST", "/api/v1/groups",
                         {"name": "other", "members": ["web01", "db01"]}, 409,
                         "group_machine_taken")
    assert "'db01'" in msg and "'erp'" in msg
    msg = await _refused(api, "POST", "/api/v1/groups", {"name": "other",
                                                         "members": ["ghost"]},
                         422, "group_machine_unknown")
    assert "ghost" in msg
    msg = await _refused(api, "POST", "/api/v1/groups/erp/members",
                         {"machines": ["far01"]}, 422, "group_process_servers_differ")
    assert "ps1: app01, db01" in msg and "ps2: far01" in msg
    await _refused(api, "POST", "/api/v1/groups/erp/members", {"machines": ["loose01"]},
                   422, "group_machine_unassigned")
    await _refused(api, "POST", "/api/v1/groups", {"name": "erp", "members": ["web01"]},
                   409, "group_exists")
    await _refused(api, "POST", "/api/v1/groups", {"name": "x", "members": []}, 422,
                   "invalid_request")
    await _refused(api, "DELETE", "/api/v1/groups/erp/members/web01", None, 404,
                   "group_member_not_found")
    await _refused(api, "GET", "/api/v1/groups/nope", None, 404, "group_not_found")
    g = await api.post("/api/v1/groups/erp/members", {"machines": ["web01", "db01"]})
    assert g["members"] == ["app01", "db01", "web01"]
    g = await api.call("DELETE", "/api/v1/groups/erp/members/web01", None, {})
    assert g["members"] == ["app01", "db01"]
    g = await api.call("PATCH", "/api/v1/groups/erp", {"interval_seconds": 900}, {})
    assert g["interval_seconds"] == 900
    await _refused(api, "DELETE", "/api/v1/machines/db01", None, 409, "machine_in_group")
    msg = await _refused(api, "PATCH", "/api/v1/machines/db01", {"process_server": "ps2"},
                         409, "group_process_servers_differ")
    assert "app01 (ps1)" in msg
    assert (await api.get("/api/v1/machines/db01"))["process_server"] == "ps1"
    assert (await api.get("/api/v1/machines/db01"))["name"] == "db01"
    # web01 is free again: a group of its own
    await api.post("/api/v1/groups", {"name": "web", "members": ["web01"]})
    assert [x["name"] for x in (await api.get("/api/v1/groups"))["groups"]] == ["erp", "web"]
    assert (await api.call("DELETE", "/api/v1/groups/web", None, {})) == {"deleted": "web"}
    assert [x["name"] for x in (await api.get("/api/v1/groups"))["groups"]] == ["erp"]


async def test_group_points_reported_by_a_process_server(cs: ConfigServer,
                                                         api: ApiClient) -> None:
    await _site(cs, api)
    await api.post("/api/v1/groups", {"name": "erp", "members": ["app01", "db01"]})
    ok, bad = uuid.uuid4().hex, uuid.uuid4().hex
    cycles = {"app01": uuid.uuid4().hex, "db01": uuid.uuid4().hex}
    async with ApiClient(cs.url, cs.internal_token) as internal:
        for _ in range(2):  # a repeated report changes nothing
            await internal.post("/api/v1/internal/group-points", {
                "id": ok, "group": "erp", "created": 1.8e9, "state": "released",
                "members": cycles})
        await internal.post("/api/v1/internal/group-points", {
            "id": bad, "group": "erp", "created": 1.8e9 + 60, "state": "failed",
            "members": {"app01": cycles["app01"], "db01": None},
            "error": "db01 did not reach the barrier within 30 s"})
    points = (await api.get("/api/v1/groups/erp/points"))["points"]
    assert [(p["id"], p["state"]) for p in points] == [(ok, "pending"), (bad, "failed")]
    assert points[1]["error"] == "db01 did not reach the barrier within 30 s"
    # the members' points arrive in the catalog: the group point is complete
    pids = {}
    for m, cycle in cycles.items():
        pids[m] = uuid.uuid4().hex + uuid.uuid4().hex
        await _report_cycle_point(cs, m, pids[m], cycle)
    p = await api.get(f"/api/v1/groups/erp/points/{ok}")
    assert p["state"] == "complete"
    assert {m["machine"]: m["point"] for m in p["members"]} == pids
    events = (await api.get("/api/v1/events", code="group_point_failed"))["events"]
    assert [e["target"] for e in events] == ["group:erp"]
    assert bad in events[0]["message"] and "db01" in events[0]["message"]
    assert (await api.get("/api/v1/groups/erp"))["last_point"]["id"] == bad


async def test_a_released_group_point_a_member_never_completes_ends_failed(
        cs: ConfigServer, api: ApiClient) -> None:
    """db01's point of a released group point never comes while app01's is in: after
    the group's interval (at least SETTLE_MIN_SECONDS) the group point ends failed
    naming db01 (the settling's clock moved by the test, its catalog the real one);
    a process server's later ``failed`` report of a released group point ends it too."""
    await _site(cs, api)
    await api.post("/api/v1/groups", {"name": "erp", "members": ["app01", "db01"],
                                      "interval_seconds": 600})
    gp, late = uuid.uuid4().hex, uuid.uuid4().hex
    cycles = {"app01": uuid.uuid4().hex, "db01": uuid.uuid4().hex}
    async with ApiClient(cs.url, cs.internal_token) as internal:
        for g in (gp, late):
            await internal.post("/api/v1/internal/group-points", {
                "id": g, "group": "erp", "created": 1.8e9, "state": "released",
                "members": cycles if g == gp else {m: uuid.uuid4().hex for m in cycles}})
    # (its point's moment is the group point's: no later cycle of app01's)
    await _report_cycle_point(cs, "app01", uuid.uuid4().hex * 2, cycles["app01"])
    now = [time.time()]
    core = Core(cs.engine, cs.sessionmaker, lambda: now[0], cs.notifier, cs.metrics)
    assert await groupsettle.settle_once(core) == {}
    now[0] += groupsettle.SETTLE_MIN_SECONDS - 60
    assert await groupsettle.settle_once(core) == {}
    assert (await api.get(f"/api/v1/groups/erp/points/{gp}"))["state"] == "pending"
    now[0] += 120
    assert await groupsettle.settle_once(core) == {gp: "failed"}
    p = await api.get(f"/api/v1/groups/erp/points/{gp}")
    assert p["state"] == "failed" and p["error"].startswith("db01: no point of its cycle")
    assert await groupsettle.settle_once(core) == {}  # decided once
    # the process server learns that a member's cycle failed after the release
    why = f"db01's cycle of group point {late} was aborted: resume window passed"
    async with ApiClient(cs.url, cs.internal_token) as internal:
        for _ in range(2):  # a repeat changes nothing
            await internal.post("/api/v1/internal/group-points", {
                "id": late, "group": "erp", "created": time.time() - 5, "state": "failed",
                "members": {m: None for m in cycles}, "error": why})
    p = await api.get(f"/api/v1/groups/erp/points/{late}")
    assert (p["state"], p["error"]) == ("failed", why)
    # db01 went on without its cycle of a third group point: a point of a later cycle
    third = uuid.uuid4().hex
    async with ApiClient(cs.url, cs.internal_token) as internal:
        await internal.post("/api/v1/internal/group-points", {
            "id": third, "group": "erp", "created": 1.8e9 - 60, "state": "released",
            "members": {"app01": uuid.uuid4().hex, "db01": cycles["db01"]}})
    newer = uuid.uuid4().hex * 2
    await _report_cycle_point(cs, "db01", newer, uuid.uuid4().hex)
    assert await groupsettle.settle_once(core) == {third: "failed"}
    p = await api.get(f"/api/v1/groups/erp/points/{third}")
    assert p["error"].startswith(f"db01's cycle {cycles['db01']} of this group point made "
                                 "no point: it failed or was abandoned after the barrier "
                                 f"released it (db01's point {newer} of a later cycle"), p
    events = (await api.get("/api/v1/events", code="group_point_failed"))["events"]
    assert sorted(e["message"].split()[2] for e in events) == sorted([gp, late, third])
    assert any("db01: no point of its cycle" in e["message"] for e in events)
    assert any(why in e["message"] for e in events)


async def _report_cycle_point(cs: ConfigServer, machine: str, pid: str, cycle: str) -> None:
    """A point report as a process server sends it: the manifest's fields, its cycle too."""
    async with ApiClient(cs.url, cs.internal_token) as internal:
        await internal.post("/api/v1/internal/points", {
            "id": pid, "machine": machine, "created": "2027-01-15T08:00:00.000000Z",
            "consistency": "crash", "cycle": cycle, "base": None, "chain": 0, "disks": [],
            "policy": "default", "format": 1})


async def _cli(cs: ConfigServer, capsys: pytest.CaptureFixture[str], *args: str
               ) -> tuple[int, str, str]:
    capsys.readouterr()
    saved = structlog.get_config()
    try:
        rc = await asyncio.to_thread(main, [*args, "--api", cs.url, "--token-file",
                                            str(cs.cfg.token_path)])
    finally:
        structlog.configure(**saved)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_group_cli(cs: ConfigServer, api: ApiClient,
                         capsys: pytest.CaptureFixture[str]) -> None:
    await _site(cs, api)
    rc, out, err = await _cli(cs, capsys, "group", "create", "erp", "app01", "db01",
                              "--interval", "600", "--barrier-timeout", "20", "--json")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["barrier_timeout_seconds"] == 20
    rc, out, err = await _cli(cs, capsys, "group", "add", "erp", "far01")
    assert rc == 2 and "different process servers" in err and "ps2: far01" in err, err
    rc, out, err = await _cli(cs, capsys, "group", "create", "two", "db01")
    assert rc == 2 and "one group at most" in err and "group remove erp db01" in err, err
    rc, out, err = await _cli(cs, capsys, "group", "add", "erp", "web01")
    assert rc == 0 and "app01, db01, web01" in out, err
    rc, out, err = await _cli(cs, capsys, "group", "remove", "erp", "web01")
    assert rc == 0 and "app01, db01" in out and "web01" not in out, err
    rc, out, err = await _cli(cs, capsys, "group", "list")
    assert rc == 0 and "erp" in out and "ps1" in out, err
    rc, out, err = await _cli(cs, capsys, "group", "points", "erp", "--json")
    assert rc == 0 and json.loads(out.strip().splitlines()[-1]) == {"points": []}, err
    rc, out, err = await _cli(cs, capsys, "group", "update", "erp")
    assert rc == 2 and "nothing to change" in err, err
    rc, out, err = await _cli(cs, capsys, "group", "show", "nope")
    assert rc == 2 and "siterecovery group list" in err, err
    rc, out, err = await _cli(cs, capsys, "group", "delete", "erp")
    assert rc == 0 and "erp deleted" in out, err
    assert (await api.get("/api/v1/groups")) == {"groups": []}
