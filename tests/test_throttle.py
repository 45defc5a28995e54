"""Bandwidth limits: the schedule and the token bucket, on injected clocks (no waiting)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from common.pacing import Schedule, TokenBucket, parse_days, parse_hours
from tests.helpers import Pki
from vault.store.memory import MemoryStore
from vault.store.throttle import ThrottleStore

MONDAY_10 = dt.datetime(2026, 11, 23, 10, 0)  # a Monday
MONDAY_20 = dt.datetime(2026, 11, 23, 20, 0)
SATURDAY_10 = dt.datetime(2026, 11, 28, 10, 0)


def test_schedule_parsing_and_errors() -> None:
    assert parse_days("mon-fri") == frozenset(range(5))
    assert parse_days("fri-mon") == frozenset({4, 5, 6, 0})
    assert parse_days("sat,sun") == frozenset({5, 6})
    assert parse_hours("08:00-18:30") == (480, 1110)
    assert parse_hours("00:00-24:00") == (0, 1440)
    for bad in ("monday", "mon-xyz", ""):
        with pytest.raises(ValueError, match="work days"):
            parse_days(bad)
    for bad in ("8-18", "18:00-08:00", "25:00-26:00"):
        with pytest.raises(ValueError, match="work hours"):
            parse_hours(bad)
    with pytest.raises(ValueError, match="unlimited"):
        Schedule.from_mbps(-1, 0)


def test_work_hours_and_off_hours_rates() -> None:
    s = Schedule.from_mbps(80, 800, "mon-fri", "08:00-18:00")
    assert s.rate_at(MONDAY_10) == 10_000_000  # 80 Mbit/s in bytes
    assert s.rate_at(MONDAY_20) == 100_000_000
    assert s.rate_at(SATURDAY_10) == 100_000_000
    assert s.rate_at(MONDAY_10.replace(hour=18)) == 100_000_000  # the end is exclusive
    assert s.rate_at(MONDAY_10.replace(hour=8)) == 10_000_000


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


async def test_bucket_holds_the_average_rate_and_switches_with_the_schedule() -> None:
    clock = FakeTime()
    when = [MONDAY_10]
    bucket = TokenBucket(Schedule.from_mbps(8, 0), now=lambda: when[0],
                         monotonic=clock.monotonic, sleep=clock.sleep)  # 1 MB/s at work
    start = clock.t
    for _ in range(10):
        await bucket.take(500_000)
    # 5 MB at 1 MB/s with a one-second burst: 4 s of waiting.
    assert clock.t - start == pytest.approx(4.0)
    when[0] = MONDAY_20  # off hours: unlimited here
    assert await bucket.take(50_000_000) == 0.0
    assert clock.t - start == pytest.approx(4.0)


async def test_throttle_store_paces_uploads_only() -> None:
    clock = FakeTime()
    inner = MemoryStore()
    store = ThrottleStore(inner, TokenBucket(Schedule.from_mbps(8, 8), now=lambda: MONDAY_10,
                                             monotonic=clock.monotonic, sleep=clock.sleep))
    for i in range(4):
        await store.put(f"packs/p{i}", bytes(1_000_000))
    assert clock.t - 1000.0 == pytest.approx(3.0)
    assert await store.get("packs/p0") == bytes(1_000_000)  # reads are not paced
    assert clock.t - 1000.0 == pytest.approx(3.0)


def test_process_server_config_refuses_a_bad_schedule() -> None:
    from procserver.config import ProcServerConfig
    from siterecovery.tomlconfig import ConfigError, from_mapping

    base = {"data_dir": "/x", "vault_url": "file:///v", "vault_key_file": "/k",
            "tls_cert": "/c", "tls_key": "/k", "tls_ca": "/a"}
    for bad, match in (({"work_hours": "9-5"}, "work hours"),
                       ({"work_days": "weekdays"}, "work days"),
                       ({"upload_limit_work_mbps": -5.0}, "unlimited")):
        with pytest.raises(ConfigError, match=match):
            from_mapping(ProcServerConfig, {**base, **bad}, "procserver.toml")


async def test_a_throttled_process_server_still_makes_exact_points(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    from tests.helpers import (
        agent_config,
        make_agent,
        make_disk,
        open_vault,
        proc_config,
        restore_all,
        running_procserver,
        sha256,
    )

    url, key = vault_at
    disk = tmp_path / "disk.img"
    make_disk(disk, 4 << 20, seed=8)
    cfg = proc_config(tmp_path, pki, url, key, upload_limit_work_mbps=400.0,
                      upload_limit_off_mbps=800.0)
    async with running_procserver(cfg) as ps:
        assert isinstance(ps.vault.store, ThrottleStore)  # the setting reaches the uploads
        agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
        try:
            r = await agent.replicate_once()
        finally:
            agent.close()
        pid = await ps.wait_point(r.cycle)
    vault = await open_vault(tmp_path / "vault", key)
    try:
        assert await restore_all(vault, await vault.read_point(pid), tmp_path / "o") == {
            "sda": sha256(disk)}
    finally:
        await vault.close()
