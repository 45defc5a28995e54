"""Replication policies through the real admin API and CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import run_cli

DEFAULTS = {"rpo_threshold_seconds": 900, "retention_hours": 24,
            "app_consistent_frequency_seconds": 14400,
            "crash_consistent_interval_seconds": 60, "block_size": 65536}
GOLD = {"rpo_threshold_seconds": 600, "retention_hours": 72,
        "app_consistent_frequency_seconds": 3600, "crash_consistent_interval_seconds": 30,
        "block_size": 262144}


async def _refused(coro: Any, status: int, code: str) -> ApiCallError:
    with pytest.raises(ApiCallError) as e:
        await coro
    assert (e.value.status, e.value.api_code) == (status, code), e.value
    assert e.value.message and e.value.hint
    return e.value


async def _machine(api: ApiClient, name: str) -> None:
    await api.post("/api/v1/machines", {"name": name, "ip": "10.0.0.7", "os_type": "linux",
                                        "os_name": "ubuntu", "os_version": "22.04"})


async def test_default_policy_exists_from_first_start_and_keeps_changes(
        tmp_path: Path, catalog_url: str) -> None:
    cfg = ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0, site_port=-1,
                             database_url=catalog_url)
    for attempt in range(2):
        server = ConfigServer(cfg)
        await server.start()
        try:
            async with ApiClient(server.url, server.admin_token) as api:
                listed = (await api.get("/api/v1/policies"))["policies"]
                assert [p["name"] for p in listed] == ["default"]
                p = await api.get("/api/v1/policies/default")
                if attempt == 0:
                    assert {k: p[k] for k in DEFAULTS} == DEFAULTS
                    assert p["items"] == 0 and p["created"].endswith("Z")
                    await api.patch("/api/v1/policies/default", {"retention_hours": 48})
                else:  # a restart does not reset what the operator changed
                    assert p["retention_hours"] == 48
                await _refused(api.delete("/api/v1/policies/default"), 409, "default_policy")
        finally:
            await server.stop()


async def test_create_list_show_update_delete(api: ApiClient) -> None:
    created = await api.post("/api/v1/policies", {"name": "gold", **GOLD})
    assert {k: created[k] for k in GOLD} == GOLD
    assert created["items"] == 0
    partial = await api.post("/api/v1/policies", {"name": "bronze", "retention_hours": 168})
    assert {k: partial[k] for k in DEFAULTS} == {**DEFAULTS, "retention_hours": 168}
    names = [p["name"] for p in (await api.get("/api/v1/policies"))["policies"]]
    assert names == ["bronze", "default", "gold"]
    assert (await api.get("/api/v1/policies/gold")) == created

    updated = await api.patch("/api/v1/policies/gold", {"rpo_threshold_seconds": 1800,
                                                        "block_size": 1048576})
    assert updated["rpo_threshold_seconds"] == 1800 and updated["block_size"] == 1048576
    assert updated["retention_hours"] == 72  # untouched fields stay
    assert updated["updated"] >= created["updated"]
    assert (await api.get("/api/v1/policies/gold")) == updated

    assert await api.delete("/api/v1/policies/gold") == {"deleted": "gold"}
    await _refused(api.get("/api/v1/policies/gold"), 404, "policy_not_found")
    await _refused(api.delete("/api/v1/policies/gold"), 404, "policy_not_found")
    await _refused(api.patch("/api/v1/policies/gold", {"retention_hours": 2}), 404,
                   "policy_not_found")


async def test_duplicate_create_is_refused_and_changes_nothing(api: ApiClient) -> None:
    first = await api.post("/api/v1/policies", {"name": "gold", **GOLD})
    e = await _refused(api.post("/api/v1/policies", {"name": "gold", "retention_hours": 5}),
                       409, "policy_exists")
    assert "policy update" in e.hint
    assert (await api.get("/api/v1/policies/gold")) == first
    await _refused(api.post("/api/v1/policies", {"name": "default"}), 409, "policy_exists")


@pytest.mark.parametrize("field,value", [
    ("rpo_threshold_seconds", 59), ("rpo_threshold_seconds", 86401),
    ("retention_hours", 0), ("retention_hours", 361),
    ("app_consistent_frequency_seconds", -1), ("app_consistent_frequency_seconds", 43201),
    ("crash_consistent_interval_seconds", 4), ("block_size", 32768),
    ("block_size", 2 * 1048576), ("block_size", 100000), ("retention_hours", "24"),
    ("rpo_threshold_seconds", True), ("colour", 1),
])
async def test_out_of_bounds_fields_are_refused(api: ApiClient, field: str,
                                                value: object) -> None:
    before = await api.get("/api/v1/policies")
    e = await _refused(api.post("/api/v1/policies", {"name": "bad", field: value}), 422,
                       "invalid_request")
    assert field in e.message
    e = await _refused(api.patch("/api/v1/policies/default", {field: value}), 422,
                       "invalid_request")
    assert field in e.message
    assert await api.get("/api/v1/policies") == before


@pytest.mark.parametrize("fields,named,suggests", [
    ({"rpo_threshold_seconds": 300, "crash_consistent_interval_seconds": 600},
     ["crash_consistent_interval_seconds (600)", "rpo_threshold_seconds (300)"],
     "at most 300 s"),
    ({"crash_consistent_interval_seconds": 60, "app_consistent_frequency_seconds": 90},
     ["app_consistent_frequency_seconds (90)", "crash_consistent_interval_seconds (60)"],
     "e.g. 60 or 120"),
    ({"crash_consistent_interval_seconds": 600, "app_consistent_frequency_seconds": 300},
     ["app_consistent_frequency_seconds (300)", "crash_consistent_interval_seconds (600)"],
     "e.g. 600"),
    ({"retention_hours": 2, "app_consistent_frequency_seconds": 4 * 3600},
     ["app_consistent_frequency_seconds (14400)", "retention_hours 2"],
     "raise retention_hours to 4"),
    ({"retention_hours": 1, "rpo_threshold_seconds": 7200,
      "crash_consistent_interval_seconds": 5400, "app_consistent_frequency_seconds": 0},
     ["crash_consistent_interval_seconds (5400)", "retention_hours 1"], "3600 s"),
])
async def test_fields_must_fit_together(api: ApiClient, fields: dict[str, int],
                                        named: list[str], suggests: str) -> None:
    before = await api.get("/api/v1/policies")
    e = await _refused(api.post("/api/v1/policies", {"name": "odd", **fields}), 422,
                       "invalid_policy")
    for text in [*named, suggests]:
        assert text in e.message, e.message
    # The same through an update: the merged policy is checked, nothing is written.
    e = await _refused(api.patch("/api/v1/policies/default", fields), 422, "invalid_policy")
    assert named[0] in e.message
    assert await api.get("/api/v1/policies") == before


async def test_app_consistent_off_and_fitting_values_are_accepted(api: ApiClient) -> None:
    p = await api.post("/api/v1/policies", {"name": "crashonly",
                                            "app_consistent_frequency_seconds": 0})
    assert p["app_consistent_frequency_seconds"] == 0
    # An update that only fits together with another field in the same call goes through.
    p = await api.patch("/api/v1/policies/crashonly", {
        "crash_consistent_interval_seconds": 1800, "rpo_threshold_seconds": 3600,
        "app_consistent_frequency_seconds": 7200})
    assert p["crash_consistent_interval_seconds"] == 1800


async def test_policy_in_use_cannot_be_deleted_nor_change_block_size(
        cs: ConfigServer, api: ApiClient) -> None:
    await api.post("/api/v1/policies", {"name": "gold", **GOLD})
    await _machine(api, "web01")
    await api.post("/api/v1/replication/enable", {"machine": "web01", "policy": "gold"})
    assert (await api.get("/api/v1/policies/gold"))["items"] == 1
    listed = {p["name"]: p["items"] for p in (await api.get("/api/v1/policies"))["policies"]}
    assert listed == {"default": 0, "gold": 1}

    e = await _refused(api.delete("/api/v1/policies/gold"), 409, "policy_in_use")
    assert "web01" in e.message and "replication disable" in e.hint
    before = await api.get("/api/v1/policies/gold")
    e = await _refused(api.patch("/api/v1/policies/gold", {"block_size": 65536}), 409,
                       "policy_in_use")
    assert "web01" in e.message
    assert await api.get("/api/v1/policies/gold") == before
    # Other fields of a policy in use may change.
    p = await api.patch("/api/v1/policies/gold", {"retention_hours": 96})
    assert p["retention_hours"] == 96 and p["items"] == 1

    await api.post("/api/v1/replication/disable", {"machine": "web01"})
    async with asyncio.timeout(60), cs.changed:  # the Disable protection job removes the item
        while (await api.get("/api/v1/policies/gold"))["items"]:
            await cs.changed.wait()
    assert await api.delete("/api/v1/policies/gold") == {"deleted": "gold"}


# The CLI is the same over either catalog (the API tests run on both): SQLite only.
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_policy_cli(cs: ConfigServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(cs.admin_token)
    api = ["--api", cs.url, "--token-file", str(token)]

    def cli(*args: str) -> Any:
        return asyncio.to_thread(run_cli, *args)

    r = await cli("policy", "create", "gold", "--rpo-threshold", "10m", "--retention", "3d",
                  "--app-consistent-frequency", "1h", "--crash-consistent-interval", "30s",
                  "--block-size", "256K", *api)
    assert r.returncode == 0, r.stderr
    assert "RPO threshold:             10m" in r.stdout
    r = await cli("policy", "show", "gold", "--json", *api)
    assert r.returncode == 0, r.stderr
    assert {k: json.loads(r.stdout)[k] for k in GOLD} == GOLD
    r = await cli("policy", "list", *api)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "RPO", "THRESHOLD"]
    assert [row.split()[0] for row in rows] == ["default", "gold"]
    assert rows[1].split()[1:6] == ["10m", "72h", "1h", "30s", "256K"]
    r = await cli("policy", "list", "--json", *api)
    assert [p["name"] for p in json.loads(r.stdout)["policies"]] == ["default", "gold"]

    r = await cli("policy", "update", "gold", "--app-consistent-frequency", "off", "--json",
                  *api)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["app_consistent_frequency_seconds"] == 0

    # Refusals: exit 2 with the server's message and hint, nothing changed.
    r = await cli("policy", "update", "gold", "--crash-consistent-interval", "20m", *api)
    assert r.returncode == 2
    assert "must not exceed rpo_threshold_seconds" in r.stderr and "hint:" in r.stderr
    r = await cli("policy", "create", "x", "--rpo-threshold", "soon", *api)
    assert r.returncode == 2 and "not a duration" in r.stderr
    r = await cli("policy", "update", "gold", *api)
    assert r.returncode == 2 and "nothing to change" in r.stderr
    r = await cli("policy", "delete", "default", *api)
    assert r.returncode == 2 and "cannot be deleted" in r.stderr
    async with ApiClient(cs.url, cs.admin_token) as client:
        gold = await client.get("/api/v1/policies/gold")
        assert gold["crash_consistent_interval_seconds"] == 30
        assert gold["app_consistent_frequency_seconds"] == 0

    r = await cli("policy", "delete", "gold", *api)
    assert r.returncode == 0 and "deleted" in r.stdout
    r = await cli("policy", "show", "gold", *api)
    assert r.returncode == 2 and "no policy named 'gold'" in r.stderr
