"""Alerts at their thresholds, aged with an injected clock, through the real HTTP API and
/metrics, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import time
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
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.sitehelpers import (
    AgentSite,
    add_machine,
    add_procserver,
    next_job,
    register_new_vault,
    report_point,
    step_running,
    wait_job,
)
from tests.test_console_http import _browser, _sign_in
from tests.test_procservers import beat, post_beat, wait_until

# The injected clock starts at the real time (whole seconds): the CA dates certificates
# by it, and TLS checks them against the real one.
T0 = float(int(time.time()))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Aged:
    cs: ConfigServer
    clock: Clock
    api: ApiClient

    async def beat(self, **kw: Any) -> None:
        status, body = await post_beat(self.cs, beat(**kw))
        assert status == 200, body

    async def evaluate(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = (await self.api.post("/api/v1/alerts/evaluate"))["events"]
        return events

    async def active(self, target: str = "ps1") -> list[tuple[str, str]]:
        evs = (await self.api.get("/api/v1/events", active=True, target=target))["events"]
        return [(e["code"], e["severity"]) for e in evs]

    async def history(self, code: str) -> list[dict[str, Any]]:
        evs: list[dict[str, Any]] = (await self.api.get("/api/v1/events", code=code))["events"]
        return evs

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.cs.url}/metrics") as r:
            text = await r.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
async def aged(tmp_path: Path, catalog_url: str) -> AsyncIterator[Aged]:
    """A configuration server whose clock the test moves (SQLite and PostgreSQL)."""
    clock = Clock()
    cs = ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0,
                                         site_port=0, database_url=catalog_url,
                                         alert_interval_seconds=3600), clock=clock)
    await cs.start()
    try:
        async with ApiClient(cs.url, cs.admin_token) as api:
            yield Aged(cs, clock, api)
    finally:
        await cs.stop()


def active_gauge(m: dict[Any, float], severity: str, code: str) -> float:
    return m[("siterecovery_configserver_alerts_active",
              (("code", code), ("severity", severity)))]


def ps_gauge(m: dict[Any, float], name: str, ps: str = "ps1") -> float:
    return m[(f"siterecovery_configserver_procserver_{name}", (("procserver", ps),))]


async def test_cache_free_thresholds(aged: Aged) -> None:
    code = "procserver_cache_free_low"
    steps = [(0.31, []), (0.30, []), (0.29, [(code, "warning")]), (0.25, [(code, "warning")]),
             (0.24, [(code, "critical")]), (0.29, [(code, "warning")]), (0.5, [])]
    for i, (ratio, want) in enumerate(steps):
        aged.clock.now = T0 + 10 * i
        await aged.beat(cache_free_ratio=ratio)  # every heartbeat evaluates at once
        assert await aged.active() == want, ratio
        m = await aged.metrics()
        assert ps_gauge(m, "cache_free_ratio") == ratio
        for sev in ("warning", "critical"):
            assert active_gauge(m, sev, code) == (1 if (code, sev) in want else 0)
        doc = await aged.api.get("/api/v1/procservers/ps1")
        assert doc["health"] == (want[0][1] if want else "normal")
        assert [(a["code"], a["severity"]) for a in doc["alerts"]] == want
    # The history: raised at 0.29 (step 2), became critical at 0.24 (step 4: the warning
    # is cleared and a critical one opened), back to warning (5), cleared at 0.5 (6).
    hist = await aged.history(code)
    assert [(e["severity"], e["time"], e["cleared_at"], e["active"]) for e in hist] == [
        ("warning", iso(T0 + 50), iso(T0 + 60), False),
        ("critical", iso(T0 + 40), iso(T0 + 50), False),
        ("warning", iso(T0 + 20), iso(T0 + 40), False),
    ]
    assert "29%" in hist[0]["message"] and "below 30%" in hist[0]["message"]
    assert "24%" in hist[1]["message"] and "below 25%" in hist[1]["message"]


async def test_upload_backlog_thresholds(aged: Aged) -> None:
    code = "procserver_upload_backlog"
    steps = [(1800, []), (31 * 60, [(code, "warning")]), (45 * 60, [(code, "warning")]),
             (46 * 60, [(code, "critical")]), (0, [])]
    for i, (backlog, want) in enumerate(steps):
        aged.clock.now = T0 + i
        await aged.beat(backlog_seconds=backlog, backlog_bytes=backlog * 1000)
        assert await aged.active() == want, backlog
        m = await aged.metrics()
        assert ps_gauge(m, "upload_backlog_seconds") == backlog
        assert ps_gauge(m, "upload_backlog_bytes") == backlog * 1000
        assert active_gauge(m, "critical", code) == (1 if (code, "critical") in want else 0)
    # The warning stayed one event from 31 to 45 min (its message kept current).
    hist = await aged.history(code)
    assert [(e["severity"], e["active"]) for e in hist] == [("critical", False),
                                                           ("warning", False)]
    assert "46.0 min" in hist[0]["message"] and "45.0 min" in hist[1]["message"]


async def test_no_heartbeat_for_15_minutes_is_critical(aged: Aged) -> None:
    code = "procserver_heartbeat_missing"
    await aged.beat()
    aged.clock.now = T0 + 899
    assert await aged.evaluate() == []
    doc = await aged.api.get("/api/v1/procservers/ps1")
    assert doc["seconds_since_contact"] == 899 and doc["health"] == "normal"
    assert ps_gauge(await aged.metrics(), "heartbeat_age_seconds") == 899
    aged.clock.now = T0 + 900
    events = await aged.evaluate()
    assert [(e["code"], e["severity"], e["target"]) for e in events] == [
        (code, "critical", "ps1")]
    assert "no heartbeat for 15.0 min" in events[0]["message"]
    m = await aged.metrics()
    assert active_gauge(m, "critical", code) == 1
    assert ps_gauge(m, "heartbeat_age_seconds") == 900
    assert (await aged.api.get("/api/v1/procservers/ps1"))["health"] == "critical"
    aged.clock.now = T0 + 3600  # still missing: the same event, not a second one
    await aged.evaluate()
    assert ps_gauge(await aged.metrics(), "heartbeat_age_seconds") == 3600
    assert len(await aged.history(code)) == 1
    await aged.beat()  # it is back: the alert clears
    assert await aged.active() == []
    hist = await aged.history(code)
    assert [(e["time"], e["cleared_at"], e["active"]) for e in hist] == [
        (iso(T0 + 900), iso(T0 + 3600), False)]
    m = await aged.metrics()
    assert active_gauge(m, "critical", code) == 0 and ps_gauge(m, "heartbeat_age_seconds") == 0
    assert ps_gauge(m, "heartbeats_total") == 2


async def test_silence_counts_from_the_configuration_servers_start(
        tmp_path: Path, catalog_url: str) -> None:
    """Heartbeats cannot arrive while the configuration server is down: after a long
    outage the process servers get 15 minutes from its start, not an alert at once."""
    clock = Clock()
    cfg = ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0, site_port=-1,
                             database_url=catalog_url, alert_interval_seconds=3600)
    cs = ConfigServer(cfg, clock=clock)
    await cs.start()
    try:
        assert (await post_beat(cs, beat()))[0] == 200
    finally:
        await cs.stop()
    clock.now = T0 + 7200  # two hours down
    cs = ConfigServer(cfg, clock=clock)
    await cs.start()
    try:
        async with ApiClient(cs.url, cs.admin_token) as api:
            aged = Aged(cs, clock, api)
            assert await aged.evaluate() == []
            assert ps_gauge(await aged.metrics(), "heartbeat_age_seconds") == 7200
            clock.now = T0 + 7200 + 899
            assert await aged.evaluate() == []
            clock.now = T0 + 7200 + 900
            assert [e["code"] for e in await aged.evaluate()] == [
                "procserver_heartbeat_missing"]
            assert "no heartbeat for 135.0 min" in (await aged.history(
                "procserver_heartbeat_missing"))[0]["message"]
    finally:
        await cs.stop()


async def test_alerts_of_several_kinds_and_servers_are_independent(aged: Aged) -> None:
    await aged.beat(cache_free_ratio=0.2, backlog_seconds=2000)
    await aged.beat(name="ps2", cache_free_ratio=0.27)
    aged.clock.now = T0 + 600
    await aged.beat(name="ps2", cache_free_ratio=0.27)
    aged.clock.now = T0 + 900  # ps1 silent for 15 min, ps2 for 5
    await aged.evaluate()
    assert sorted(await aged.active("ps1")) == [
        ("procserver_cache_free_low", "critical"), ("procserver_heartbeat_missing", "critical"),
        ("procserver_upload_backlog", "warning")]
    assert await aged.active("ps2") == [("procserver_cache_free_low", "warning")]
    m = await aged.metrics()
    assert active_gauge(m, "critical", "procserver_cache_free_low") == 1
    assert active_gauge(m, "warning", "procserver_cache_free_low") == 1
    assert ps_gauge(m, "heartbeat_age_seconds", "ps2") == 300
    listed = await aged.api.get("/api/v1/events", active=True)
    assert len(listed["events"]) == 4
    assert len((await aged.api.get("/api/v1/events", limit=2))["events"]) == 2


async def test_events_and_evaluate_refuse_bad_input(aged: Aged) -> None:
    await aged.beat(cache_free_ratio=0.1)
    before = await aged.api.get("/api/v1/events")
    for query in ({"active": "maybe"}, {"limit": 0}, {"limit": "x"}, {"limit": 10001},
                  {"target": ""}):
        try:
            await aged.api.get("/api/v1/events", **query)
            raise AssertionError(f"accepted {query}")
        except ApiCallError as e:
            assert (e.status, e.api_code) == (400, "bad_query"), query
    async with aiohttp.ClientSession() as http:
        for path, method in (("/api/v1/events", "GET"), ("/api/v1/alerts/evaluate", "POST")):
            async with http.request(method, aged.cs.url + path,
                                    headers={"Authorization":
                                             f"Bearer {aged.cs.internal_token}"}) as r:
                assert r.status == 401  # the admin token only
    assert await aged.api.get("/api/v1/events") == before


def at(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


async def _protect(aged: Aged, tmp_path: Path, machine: str, point_time: float) -> None:
    """Enable protection with the 'tight' policy and drive it to 'protected' through the
    real APIs: the agent checks in and reports progress, the first point arrives."""
    api, cs = aged.api, aged.cs
    await add_machine(api, machine, ("sda",))
    agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, machine, cs.passphrase,
                                   tmp_path / "agent")
    job = (await api.post("/api/v1/replication/enable",
                          {"machine": machine, "policy": "tight"}))["job"]
    async with agent:
        await wait_job(api, job["id"], step_running("prepare_agent"))
        assert (await agent.heartbeat())[0] == 200
        await wait_job(api, job["id"], step_running("initial_replication"))
        assert (await agent.progress({"sda": 100}))[0] == 200
    await report_point(cs.url, cs.internal_token, machine, "1" * 64, at(point_time))
    assert (await wait_job(api, job["id"]))["state"] == "succeeded"
    fin = await wait_job(api, (await next_job(api, machine, "finalize_protection"))["id"])
    assert fin["state"] == "succeeded", fin
    assert (await api.get(f"/api/v1/items/{machine}"))["state"] == "protected"


def rpo_gauge(m: dict[Any, float], machine: str) -> float | None:
    return m.get(("siterecovery_configserver_item_rpo_seconds", (("machine", machine),)))


async def test_rpo_threshold_per_item(aged: Aged, tmp_path: Path) -> None:
    api, cs, code = aged.api, aged.cs, "rpo_threshold_exceeded"
    await api.post("/api/v1/policies", {"name": "tight", "rpo_threshold_seconds": 600,
                                        "crash_consistent_interval_seconds": 60,
                                        "app_consistent_frequency_seconds": 0})
    await add_procserver(cs.url, cs.internal_token)
    point_time = T0 - 30
    await _protect(aged, tmp_path, "web01", point_time)
    assert await aged.evaluate() == []
    assert rpo_gauge(await aged.metrics(), "web01") == 30

    # Keep the process server's heartbeat fresh: only the RPO is under test here.
    aged.clock.now = point_time + 600
    await aged.beat(name="ps1")
    assert await aged.active("web01") == []
    aged.clock.now = point_time + 601
    events = await aged.evaluate()
    assert [(e["code"], e["severity"], e["target"]) for e in events] == [
        (code, "warning", "web01")]
    assert "tight" in events[0]["message"] and "10.0 min" in events[0]["message"]
    m = await aged.metrics()
    assert rpo_gauge(m, "web01") == 601 and active_gauge(m, "warning", code) == 1
    item = await api.get("/api/v1/items/web01")
    assert item["health"] == "warning" and item["rpo_seconds"] == 601

    # A new point: the background evaluation (woken by the point) clears the alert.
    await report_point(cs.url, cs.internal_token, "web01", "2" * 64, at(aged.clock.now - 5))

    async def cleared() -> list[Any] | None:
        evs = (await api.get("/api/v1/events", code=code))["events"]
        return evs if evs and not evs[0]["active"] else None

    hist = await wait_until(cs, cleared)
    assert [(e["time"], e["cleared_at"]) for e in hist] == [(iso(point_time + 601),
                                                             iso(point_time + 601))]
    assert rpo_gauge(await aged.metrics(), "web01") == 5

    # Disabling protection removes the item: its alert clears and its RPO metric goes.
    aged.clock.now += 700
    await aged.beat(name="ps1")
    assert await aged.active("web01") == [(code, "warning")]
    job = (await api.post("/api/v1/replication/disable", {"machine": "web01"}))["job"]
    assert (await wait_job(api, job["id"]))["state"] == "succeeded"
    assert await aged.evaluate() == []
    m = await aged.metrics()
    assert rpo_gauge(m, "web01") is None and active_gauge(m, "warning", code) == 0


async def test_a_revoked_process_server_certificate_is_critical_until_a_new_one(
        aged: Aged) -> None:
    code = "procserver_certificate_revoked"
    await aged.beat()

    async def issue() -> str:
        doc = await aged.api.post("/api/v1/certificates/procserver",
                                  {"name": "ps1", "hosts": ["127.0.0.1"]})
        return str(doc["serial"])

    first = await issue()
    assert await aged.evaluate() == []
    await aged.api.post(f"/api/v1/certificates/{first}/revoke")
    events = await aged.evaluate()
    assert [(e["code"], e["severity"], e["target"]) for e in events] == [
        (code, "critical", "ps1")]
    assert first in events[0]["message"] and "refuses every agent" in events[0]["message"]
    assert (await aged.api.get("/api/v1/procservers/ps1"))["health"] == "critical"
    aged.clock.now = T0 + 1  # a new certificate for it: cleared
    await issue()
    assert await aged.evaluate() == []
    assert [(e["active"], e["cleared_at"]) for e in await aged.history(code)] == [
        (False, iso(T0 + 1))]


async def test_items_without_a_registration_are_counted_and_shown(aged: Aged,
                                                                   tmp_path: Path) -> None:
    """Items replicate before the server is registered with a vault, but nothing can be
    recovered through it: the gauge counts them and the console's items page says what
    to do, until the registration."""
    api, cs, gauge = aged.api, aged.cs, ("siterecovery_configserver_unrecoverable_items", ())
    await api.post("/api/v1/policies", {"name": "tight", "rpo_threshold_seconds": 600,
                                        "crash_consistent_interval_seconds": 60,
                                        "app_consistent_frequency_seconds": 0})
    await add_procserver(cs.url, cs.internal_token)
    assert (await aged.metrics())[gauge] == 0  # no item: nothing to recover yet
    await _protect(aged, tmp_path, "web01", T0 - 30)
    await aged.evaluate()
    assert (await aged.metrics())[gauge] == 1
    async with _browser() as http:
        await _sign_in(http, cs)
        async with http.get(f"{cs.url}/console/") as r:
            assert 'id="unregistered"' in await r.text()
        await register_new_vault(api, tmp_path, aged.clock())
        await aged.evaluate()
        assert (await aged.metrics())[gauge] == 0
        async with http.get(f"{cs.url}/console/") as r:
            page = await r.text()
        assert 'id="unregistered"' not in page and "web01" in page
