"""Drill freshness (#11, #17): an item's last *successful* drill — kept when a newer drill
fails — shown on the item and in ``items show``, exported as metrics, and the
``drill_overdue`` alert after ``drill_warning_days`` without one (counted from protection
when there never was one), cleared by a successful drill. Real configuration server
(SQLite and PostgreSQL), real vault and points, real drills on the folder target, with a
clock the test moves."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from configserver.config import ConfigServerConfig
from configserver.schema import iso
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from tests.csclock import Clock, clocked_configserver
from tests.failoversite import protect, register
from tests.helpers import run_cli
from tests.sitehelpers import next_job
from tests.test_failover import _run, _settings
from vault.point import Point

DAY = 86400.0
CODE = "drill_overdue"
DRILL_TIME = "siterecovery_configserver_item_last_drill_success_timestamp_seconds"
DRILL_RTO = "siterecovery_configserver_item_last_drill_rto_seconds"


@dataclass
class Drilled:
    cs: ConfigServer
    api: ApiClient
    clock: Clock
    points: list[Point]

    async def overdue(self, at: float) -> list[dict[str, Any]]:
        """Evaluate the alerts at ``at``; web01's active drill alerts."""
        self.clock.now = at
        await self.api.post("/api/v1/alerts/evaluate")
        evs: list[dict[str, Any]] = (await self.api.get(
            "/api/v1/events", active=True, target="web01", code=CODE))["events"]
        return evs

    async def metrics(self) -> dict[str, float]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.cs.url}/metrics") as r:
            text = await r.text()
        return {s.name: s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples if s.labels.get("machine") == "web01"
                and s.name in (DRILL_TIME, DRILL_RTO)}

    async def cli(self, *args: str) -> str:
        r = await asyncio.to_thread(run_cli, *args, "--api", self.cs.url, "--token-file",
                                    str(self.cs.cfg.token_path))
        assert r.returncode == 0, r.stderr
        return r.stdout


@pytest.fixture
async def drilled(tmp_path: Path, catalog_url: str) -> AsyncIterator[Drilled]:
    """web01 protected (two points of an ext4 disk) on a server whose clock the test moves
    (real time until set)."""
    clock = Clock()
    async with clocked_configserver(tmp_path / "cs", catalog_url, clock) as cs, \
            ApiClient(cs.url, cs.admin_token) as api:
        vault = await register(api, tmp_path)
        try:
            points, _ = await protect(api, cs.url, cs.site_url, cs.internal_token,
                                       cs.ca.cert_path, cs.passphrase, tmp_path, vault)
            await _settings(api)
            yield Drilled(cs, api, clock, points)
        finally:
            await vault.close()


async def test_drill_freshness(drilled: Drilled) -> None:
    d, api = drilled, drilled.api
    # Never drilled: counted from when Finalize protection succeeded.
    fin = await next_job(api, "web01", "finalize_protection")
    protected = (await api.get(f"/api/v1/jobs/{fin['id']}"))["ended"]
    t_protected = _unix(protected)
    assert await d.overdue(t_protected + 180 * DAY - 60) == []
    [ev] = await d.overdue(t_protected + 180 * DAY + 60)
    assert ev["severity"] == "warning"
    assert "no successful drill since it was protected 180 days ago" in ev["message"]
    assert "siterecovery failover test web01" in ev["message"]
    item = await api.get("/api/v1/items/web01")
    assert item["last_successful_drill"] is None
    assert await d.metrics() == {}
    assert "last good drill:    never" in await d.cli("items", "show", "web01")

    # A successful drill (real time): shown, exported, and the alert cleared.
    d.clock.now = None
    job = await _run(api, "test-failover")
    assert job["state"] == "succeeded", job
    item = await api.get("/api/v1/items/web01")
    rec, good = item["last_drill"], item["last_successful_drill"]
    p2 = d.points[1].id
    assert (good["job"], good["point"], good["rto_seconds"]) == (job["id"], p2,
                                                                rec["rto_seconds"])
    assert good["time"] == iso(rec["ended"])
    ended = rec["ended"]
    assert await d.overdue(ended + 1) == []
    assert await d.metrics() == {DRILL_TIME: ended, DRILL_RTO: rec["rto_seconds"]}
    history = (await api.get("/api/v1/events", code=CODE, target="web01"))["events"]
    assert [e["active"] for e in history] == [False]

    # 180 days later it is due again, naming the last good drill.
    assert await d.overdue(ended + 180 * DAY - 60) == []
    [ev] = await d.overdue(ended + 180 * DAY + 3 * DAY)
    assert f"no successful drill for 183 days (the last ended {iso(ended)}, point {p2})" \
        in ev["message"], ev

    # A newer drill that fails does not erase the last good one.
    d.clock.now = None
    assert (await _run(api, "cleanup-test-failover", {"notes": "fine"}))["state"] == \
        "succeeded"
    failed = await _run(api, "test-failover", {"point": "f" * 64})
    assert failed["state"] == "failed", failed
    item = await api.get("/api/v1/items/web01")
    assert item["last_drill"]["job"] == failed["id"]
    assert item["last_drill"]["result"] == "failed"
    assert item["last_successful_drill"]["job"] == job["id"]
    assert item["last_successful_drill"]["time"] == iso(ended)
    assert await d.metrics() == {DRILL_TIME: ended, DRILL_RTO: rec["rto_seconds"]}
    [still] = await d.overdue(ended + 180 * DAY + 4 * DAY)  # still due: the good one counts
    assert f"no successful drill for 184 days (the last ended {iso(ended)}, point {p2})" \
        in still["message"], still

    # items show: the settings, the last good drill, the last (failed) drill; --json too.
    d.clock.now = None
    text = await d.cli("items", "show", "web01")
    for want in ("target:           folder", "CPUs:             2",
                 "memory:           2048 MiB", "network:          prod-net (drills: drill-net)",
                 "IP:               192.0.2.50", "disks:            every disk",
                 f"last good drill:    {iso(ended)}", f"point {p2}",
                 "last drill:", "  result:           failed", f"(job {failed['id']})"):
        assert want in text, (want, text)
    shown = json.loads(await d.cli("items", "show", "web01", "--json"))
    assert shown["last_successful_drill"]["job"] == job["id"]
    assert shown["last_drill"]["result"] == "failed"

    # A successful drill 190 days on clears the alert; the metrics follow it.
    later = ended + 190 * DAY
    d.clock.now = later
    again = await _run(api, "test-failover")
    assert again["state"] == "succeeded", again
    item = await api.get("/api/v1/items/web01")
    assert item["last_successful_drill"]["job"] == again["id"]
    assert item["last_successful_drill"]["time"] == iso(later)
    assert await d.overdue(later) == []
    m = await d.metrics()
    assert m[DRILL_TIME] == later
    text = await d.cli("items", "show", "web01")
    assert "disk checks:      sda: ok (table none; 0:ext4 clean)" in text, text
    assert "boot:             not booted (the target cannot boot machines)" in text, text


def test_drill_warning_days_is_checked(tmp_path: Path) -> None:
    assert ConfigServerConfig(data_dir=str(tmp_path)).drill_warning_days == 180
    with pytest.raises(ValueError, match="drill_warning_days"):
        ConfigServerConfig(data_dir=str(tmp_path), drill_warning_days=0).validate()


def _unix(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
