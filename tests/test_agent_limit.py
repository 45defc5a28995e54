"""The agent's own bandwidth limit (work hours / off hours), on the real data path.

The bucket's clocks are injected: a fake monotonic clock that the fake sleep advances,
so the test sees exactly how long the agent would have waited, without waiting."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from common.pacing import TokenBucket
from mobility.config import MobilityConfig
from procserver.server import ProcServer
from tests.helpers import Pki, agent_config, make_agent, make_disk, mutate

SIZE = 12 << 20
MONDAY_NOON = dt.datetime(2026, 11, 23, 12, 0)
SUNDAY_NOON = dt.datetime(2026, 11, 29, 12, 0)


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.t += seconds


@pytest.mark.parametrize(("when", "mbps"), [(MONDAY_NOON, 8.0), (SUNDAY_NOON, 16.0)],
                         ids=["work-hours", "off-hours"])
async def test_agent_sends_at_most_its_limit(tmp_path: Path, pki: Pki, procserver: ProcServer,
                                             when: dt.datetime, mbps: float) -> None:
    disk = tmp_path / "d.img"
    make_disk(disk, SIZE, seed=1)
    cfg = agent_config(tmp_path, pki, "lim01", procserver.port, {"sda": disk},
                       send_limit_work_mbps=8.0, send_limit_off_mbps=16.0)
    agent = make_agent(cfg)
    fake = FakeTime()
    agent.send_limit = TokenBucket(cfg.send_schedule(), now=lambda: when,
                                   monotonic=fake.monotonic, sleep=fake.sleep)
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    rate = mbps * 125_000
    wire = r.bytes_sent + 18 * r.blocks_sent  # frame and block headers count too
    # One second's worth passes at once (the burst); the rest waits for the rate.
    assert r.bytes_sent > 2 * rate
    assert fake.slept == pytest.approx(wire / rate - 1, rel=1e-6)
    await procserver.wait_point(r.cycle)


async def test_unlimited_agent_never_waits(tmp_path: Path, pki: Pki,
                                           procserver: ProcServer) -> None:
    disk = tmp_path / "d.img"
    make_disk(disk, SIZE, seed=2)
    cfg = agent_config(tmp_path, pki, "lim02", procserver.port, {"sda": disk},
                       send_limit_work_mbps=0.0, send_limit_off_mbps=0.0)
    agent = make_agent(cfg)
    fake = FakeTime()
    agent.send_limit = TokenBucket(cfg.send_schedule(), now=lambda: MONDAY_NOON,
                                   monotonic=fake.monotonic, sleep=fake.sleep)
    try:
        await agent.replicate_once()
        mutate(disk, 0.1, seed=3)
        await agent.replicate_once()
    finally:
        agent.close()
    assert fake.slept == 0


@pytest.mark.parametrize(("field", "value", "says"), [
    ("send_limit_work_mbps", -1.0, "positive Mbit/s"),
    ("work_days", "mon-funday", "work days"),
    ("work_hours", "18:00-08:00", "start must come before the end"),
    ("work_hours", "8-18", "HH:MM-HH:MM"),
])
def test_bad_limit_settings_are_refused_with_a_clear_error(
        tmp_path: Path, pki: Pki, field: str, value: Any, says: str) -> None:
    cfg = agent_config(tmp_path, pki, "lim03", 9443, {"sda": tmp_path / "d.img"})
    bad: MobilityConfig = dataclasses.replace(cfg, **{field: value})
    with pytest.raises(ValueError, match=says):
        bad.validate()
