"""Verification of recovery points (#17): every retained point is proved to restore to
its recorded digests, on the real golden vault, with real damage."""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from configserver.server import ConfigServer
from configserver.verification import DAY, due, verify_points
from configserver.verifyjob import schedule_once
from siterecovery.apiclient import ApiClient
from tests.csclock import Clock, clocked_configserver
from tests.helpers import open_vault, run_cli
from tests.sitehelpers import wait_job
from tests.test_golden import P1, P2, Golden, _flip, copy_golden
from tests.test_notify import Receiver, receiver  # noqa: F401 - the webhook fixture
from vault.locks import LockedError, locked
from vault.point import Point
from vault.regkey import make_key


async def _verify(g: Golden, wait: float = 0.0) -> dict[str, tuple[bool, list[str], int]]:
    v = await open_vault(g.vault, g.key)
    try:
        points = await v.list_points()
        with ThreadPoolExecutor(2) as ex:
            results = await verify_points(v, points, ex, clock=lambda: 1000.0, wait=wait)
    finally:
        await v.close()
    assert all(r.verified == 1000.0 for r in results)
    return {r.point: (r.ok, r.objects, r.disks) for r in results}


async def test_clean_vault_all_verified(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    assert await _verify(g) == {P1: (True, [], 1), P2: (True, [], 1)}


async def test_flipped_byte_fails_only_the_points_that_need_it(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    off, ln = g.p1_only_block  # block 3 is in point 1 only (point 2 zeroed it)
    _flip(g.path(g.full_pack), off + ln // 2)
    got = await _verify(g)
    assert got[P2] == (True, [], 1)
    assert got[P1] == (False, [g.full_pack], 0)


async def test_a_shared_block_damaged_fails_both(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    off, ln = g.shared_block
    _flip(g.path(g.full_pack), off + ln // 2)
    got = await _verify(g)
    assert got == {P1: (False, [g.full_pack], 0), P2: (False, [g.full_pack], 0)}


async def test_missing_pack_and_map_are_named(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    os.unlink(g.path(g.delta_pack))
    got = await _verify(g)
    assert got[P1] == (True, [], 1) and got[P2] == (False, [g.delta_pack], 0)
    os.unlink(g.path(g.full_map))
    got = await _verify(g)
    assert got[P1] == (False, [g.full_map], 0) and got[P2] == (False, [g.full_map], 0)


async def test_shares_the_lock_with_uploads_and_waits_for_prune(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    v = await open_vault(g.vault, g.key)
    try:
        async with locked(v, "shared", "upload m1"):  # an upload mid-cycle
            assert all(ok for ok, _, _ in (await _verify(g)).values())
        async with locked(v, "exclusive", "prune"):
            with pytest.raises(LockedError):
                await _verify(g)
    finally:
        await v.close()


def _pt(i: int) -> Point:
    return Point(id=f"{i:064x}", machine="m", created=f"2026-01-{i:02d}T00:00:00Z",
                 consistency="crash", cycle=f"c{i}", base=None, chain=0)


def test_due_takes_new_points_then_a_daily_share_of_the_stale() -> None:
    pts = [_pt(i) for i in range(1, 11)]
    now = 100 * DAY
    # all verified long ago, the oldest verification first; a 20 % share is 2 points
    last = {p.id: now - (40 - i) * DAY for i, p in enumerate(pts)}
    assert [p.id for p in due(pts, last, now, reverify_days=30, daily_share=20)] == [
        pts[0].id, pts[1].id]
    # only those past 30 days are due at all
    assert [p.id for p in due(pts, last, now, reverify_days=35, daily_share=100)] == [
        p.id for p in pts[:6]]
    # new points come first and are all taken, whatever the share
    del last[pts[9].id], last[pts[8].id], last[pts[7].id]
    assert [p.id for p in due(pts, last, now, reverify_days=30, daily_share=20)] == [
        pts[7].id, pts[8].id, pts[9].id]
    assert due(pts, {p.id: now for p in pts}, now, reverify_days=30, daily_share=100) == []


# -- the job, through the real configuration server and its API ---------------------------

async def _register_golden(api: ApiClient, g: Golden) -> None:
    v = await open_vault(g.vault, g.key)
    try:
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(v, g.url, time.time())), "vault_key_file": str(g.key)})
    finally:
        await v.close()


async def _run(api: ApiClient, **body: object) -> dict[str, Any]:
    job = (await api.post("/api/v1/verify", body))["job"]
    assert job["kind"] == "verify_points" and job["target"] == "vault"
    return await wait_job(api, job["id"])


def _sample(text: str, name: str, machine: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("machine") == machine:
                return float(s.value)
    return None


async def test_verify_job_fails_naming_the_damage_and_alerts(
        cs: ConfigServer, api: ApiClient, tmp_path: Path,
        receiver: tuple[Receiver, str]) -> None:  # noqa: F811 - the imported fixture
    hook, hook_url = receiver
    await api.post("/api/v1/notify/channels", {"name": "hook", "kind": "webhook",
                                               "url": hook_url})
    g = await copy_golden(tmp_path)
    await _register_golden(api, g)
    done = await _run(api)
    assert done["state"] == "succeeded", done
    st = await api.get("/api/v1/verify")
    assert {(p["point"], p["ok"]) for p in st["points"]} == {(P1, True), (P2, True)}
    machine = st["points"][0]["machine"]

    off, ln = g.p1_only_block
    _flip(g.path(g.full_pack), off + ln // 2)
    # Everything was verified just now: a run of what is due verifies nothing...
    assert (await _run(api))["state"] == "succeeded"
    assert (await api.get("/api/v1/verify"))["failed"] == 0
    # ...and one of every point finds the damage, names it, and alerts.
    failed = await _run(api, all=True)
    assert failed["state"] == "failed" and g.full_pack in failed["error"], failed
    assert P1 in failed["error"] and P2 not in failed["error"]
    st = await api.get("/api/v1/verify", machine=machine)
    bad = [p for p in st["points"] if not p["ok"]]
    assert [p["point"] for p in bad] == [P1] and st["failed"] == 1
    assert [d["object"] for d in bad[0]["damaged"]] == [g.full_pack]
    events = (await api.get("/api/v1/events", active=True))["events"]
    alert = [e for e in events if e["code"] == "point_verification_failed"]
    assert len(alert) == 1 and alert[0]["target"] == machine, events
    assert g.full_pack in alert[0]["message"] and alert[0]["severity"] == "critical"
    _status, _headers, body = await hook.next()  # the notice reaches the webhook
    assert (body["event"], body["code"], body["target"]) == (
        "alert_raised", "point_verification_failed", machine)
    assert g.full_pack in body["message"]
    async with aiohttp.ClientSession() as http, http.get(f"{cs.url}/metrics") as r:
        text = await r.text()
    assert _sample(text, "siterecovery_configserver_verify_failed_points", machine) == 1
    assert _sample(text, "siterecovery_configserver_verify_unverified_points", machine) == 0
    assert _sample(text, "siterecovery_configserver_verify_last_timestamp_seconds",
                   machine) is not None

    # Repaired (the bit flipped back): verified again, the alert clears.
    _flip(g.path(g.full_pack), off + ln // 2)
    assert (await _run(api, all=True, machine=machine))["state"] == "succeeded"
    assert (await api.get("/api/v1/verify"))["failed"] == 0
    events = (await api.get("/api/v1/events", active=True))["events"]
    assert not [e for e in events if e["code"] == "point_verification_failed"]
    _status, _headers, body = await hook.next()
    assert (body["event"], body["code"]) == ("alert_cleared", "point_verification_failed")


async def test_verify_cli_run_wait_and_status(cs: ConfigServer, api: ApiClient,
                                              tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    await _register_golden(api, g)
    off, ln = g.shared_block
    _flip(g.path(g.full_pack), off + ln // 2)
    opts = ("--api", cs.url, "--token-file", str(cs.cfg.token_path))
    r = await asyncio.to_thread(run_cli, "verify", "run", "--wait", *opts)
    assert r.returncode == 1, r.stderr
    assert "failed" in r.stdout and g.full_pack in r.stdout, r.stdout
    r = await asyncio.to_thread(run_cli, "verify", "status", "--json", *opts)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["failed"] == 2 and doc["last_job"]["state"] == "failed"
    r = await asyncio.to_thread(run_cli, "verify", "status", *opts)
    assert "2 failed" in r.stdout and r.stdout.count("FAILED") == 2, r.stdout
    r = await asyncio.to_thread(run_cli, "verify", "run", "--machine", "no such", *opts)
    assert r.returncode == 2, (r.returncode, r.stderr)


async def test_schedule_queues_once_per_interval_and_only_when_registered(
        tmp_path: Path, catalog_url: str) -> None:
    clock = Clock()  # real time until the registration is in; then moved by hand
    async with clocked_configserver(tmp_path / "cs", catalog_url, clock) as cs:
        params = {"reverify_days": 30, "daily_share": 10}
        assert await schedule_once(cs.services, 24, params) is None  # no vault yet
        async with ApiClient(cs.url, cs.admin_token) as api:
            g = await copy_golden(tmp_path)
            await _register_golden(api, g)
            clock.now = time.time()
            first = await schedule_once(cs.services, 24, params)
            assert first is not None and first.params["scheduled"] is True
            assert (await wait_job(api, first.id))["state"] == "succeeded"
            clock.now += 23 * 3600
            assert await schedule_once(cs.services, 24, params) is None
            clock.now += 3600
            second = await schedule_once(cs.services, 24, params)
            assert second is not None
            assert (await wait_job(api, second.id))["state"] == "succeeded"


async def test_the_job_within_its_budget_keeps_the_index_on_disk(
        tmp_path: Path, catalog_url: str) -> None:
    """With ``gc_memory_mib = 0`` the job's index is a table in ``<data_dir>/verify-index``,
    built at the first run and used again at the next; the findings are the same."""
    async with clocked_configserver(tmp_path / "cs", catalog_url, Clock(),
                                    gc_memory_mib=0) as cs, \
            ApiClient(cs.url, cs.admin_token) as api:
        g = await copy_golden(tmp_path)
        await _register_golden(api, g)
        done = await _run(api)
        assert done["state"] == "succeeded", done
        assert done["params"]["memory_mib"] == 0
        tables = list((tmp_path / "cs" / "verify-index").glob("*.index.sqlite"))
        assert len(tables) == 1
        built = tables[0].stat().st_ino
        off, ln = g.p1_only_block
        _flip(g.path(g.full_pack), off + ln // 2)
        failed = await _run(api, all=True)
        assert failed["state"] == "failed" and g.full_pack in failed["error"], failed
        assert P1 in failed["error"] and P2 not in failed["error"]
        assert tables[0].stat().st_ino == built  # the same table, not built again
