"""A policy's send limit (#12 item 13a): the configuration server keeps it with the
policy, delivers it in the agent settings' ``bandwidth``, and the managed agent paces its
sends with it, overriding mobility.toml's limits (and gets them back when the policy has
none). The pacing is measured with injected clocks, as in test_agent_limit.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from common.pacing import Schedule, TokenBucket
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import run_cli
from tests.managedsite import managed_site

MONDAY_NOON = dt.datetime(2026, 11, 23, 12, 0)
LIMIT = {"work_mbps": 8.0, "off_mbps": 16.0, "work_days": "mon-fri",
         "work_hours": "08:00-18:00"}


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.t += seconds


async def refused(api: ApiClient, method: str, path: str, body: Any) -> tuple[int, str, str]:
    with pytest.raises(ApiCallError) as e:
        await api.call(method, path, body)
    return e.value.status, e.value.api_code, str(e.value)


async def test_policy_keeps_a_send_limit(cs: ConfigServer, api: ApiClient) -> None:
    p = await api.post("/api/v1/policies", {"name": "wan", "send_limit": {
        "work_mbps": 8, "off_mbps": 16}})
    assert p["send_limit"] == LIMIT  # days and hours default as in mobility.toml
    assert (await api.get("/api/v1/policies/default"))["send_limit"] is None
    p = await api.call("PATCH", "/api/v1/policies/wan", {"send_limit": {
        "work_mbps": 2.5, "off_mbps": 0, "work_days": "sat-sun", "work_hours": "00:00-24:00"}})
    assert p["send_limit"] == {"work_mbps": 2.5, "off_mbps": 0.0, "work_days": "sat-sun",
                               "work_hours": "00:00-24:00"}
    p = await api.call("PATCH", "/api/v1/policies/wan", {"rpo_threshold_seconds": 600})
    assert p["send_limit"]["work_mbps"] == 2.5  # other changes leave it alone
    assert (await api.get("/api/v1/policies/wan"))["send_limit"]["work_days"] == "sat-sun"
    for bad in ({"work_mbps": -1, "off_mbps": 0}, {"work_mbps": 1},
                {"work_mbps": 1, "off_mbps": 1, "work_days": "someday"},
                {"work_mbps": 1, "off_mbps": 1, "work_hours": "8-18"},
                {"work_mbps": 1, "off_mbps": 1, "extra": 1}):
        status, code, _ = await refused(api, "PATCH", "/api/v1/policies/wan",
                                        {"send_limit": bad})
        assert (status, code) == (422, "invalid_request"), bad
    # well-formed, but the start is not before the end: the cross-field check says so
    status, code, msg = await refused(api, "POST", "/api/v1/policies", {
        "name": "bad", "send_limit": {"work_mbps": 1, "off_mbps": 1,
                                      "work_hours": "18:00-08:00"}})
    assert (status, code) == (422, "invalid_policy") and "start must come before" in msg
    p = await api.call("PATCH", "/api/v1/policies/wan", {"send_limit": None})
    assert p["send_limit"] is None
    names = [x["name"] for x in (await api.get("/api/v1/policies"))["policies"]]
    assert "bad" not in names


async def test_managed_agent_sends_at_the_policy_limit(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    await api.post("/api/v1/policies", {"name": "wan", "send_limit": LIMIT})
    # mobility.toml says 4 Mbit/s at all hours; the policy overrides it
    async with managed_site(cs, api, tmp_path, policy="wan", disk_size=12 << 20,
                            send_limit_work_mbps=4.0, send_limit_off_mbps=4.0) as site:
        own = site.cfg.send_schedule()
        fake = FakeTime()
        bucket = TokenBucket(own, now=lambda: MONDAY_NOON, monotonic=fake.monotonic,
                             sleep=fake.sleep)
        site.managed.agent.send_limit = bucket
        s = await site.managed.refresh()
        assert s is not None and s.send_limit == Schedule.from_mbps(8, 16)
        assert bucket.schedule == Schedule.from_mbps(8, 16)
        assert await site.managed.round()  # the initial copy, paced at 8 Mbit/s (Monday)
        r = site.managed.last
        assert r is not None and r.kind == "full"
        rate = 8 * 125_000
        wire = r.bytes_sent + 18 * r.blocks_sent  # frame and block headers count too
        assert r.bytes_sent > 2 * rate
        assert fake.slept == pytest.approx(wire / rate - 1, rel=1e-6)

        # No limit in the policy: the agent's own mobility.toml limit is back.
        await api.call("PATCH", "/api/v1/policies/wan", {"send_limit": None})
        assert (await site.managed.refresh()) is not None
        assert bucket.schedule == own


async def test_policy_cli_send_limit(cs: ConfigServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(cs.admin_token)
    api = ["--api", cs.url, "--token-file", str(token)]

    def cli(*args: str) -> Any:
        return asyncio.to_thread(run_cli, *args)

    r = await cli("policy", "create", "wan", "--send-limit-work", "10",
                  "--send-limit-off", "0", "--work-hours", "07:00-19:00", *api)
    assert r.returncode == 0, r.stderr
    assert "agents' send limit:        10 Mbit/s mon-fri 07:00-19:00, unlimited otherwise" \
        in r.stdout
    # one value changed, the others kept
    r = await cli("policy", "update", "wan", "--send-limit-off", "50", "--json", *api)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["send_limit"] == {
        "work_mbps": 10.0, "off_mbps": 50.0, "work_days": "mon-fri",
        "work_hours": "07:00-19:00"}
    r = await cli("policy", "list", *api)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert "10/50" in rows["wan"] and "-" in rows["default"]
    r = await cli("policy", "update", "default", "--work-days", "sat", *api)
    assert r.returncode == 2 and "needs --send-limit-work and --send-limit-off" in r.stderr
    r = await cli("policy", "create", "x", "--send-limit-work", "fast", *api)
    assert r.returncode == 2 and "not a rate in Mbit/s" in r.stderr
    r = await cli("policy", "update", "wan", "--no-send-limit", "--json", *api)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["send_limit"] is None
