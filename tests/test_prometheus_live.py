"""A real Prometheus (Debian's ``prometheus``) against a running configuration server and
process server, with deploy/prometheus's rules: the RPO alert fires when an agent stops.

The test's Prometheus scrapes and evaluates every second, and its copy of the rules has
every ``for: 5m`` shortened to ``for: 2s``; the expressions are deploy/prometheus's own.
The smallest RPO threshold a policy can have is 60 s, longer than this test may take: once
the agent has stopped, the configuration server's clock (its injectable ``clock``, on
which it ages recovery points) is moved 90 s ahead, as if that time had passed without a
new point. Alerts are read from Prometheus's HTTP API (``/api/v1/alerts``), polled until
a deadline.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from tests.backends import missing_backend
from tests.managedsite import managed_site

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
ALERT = "SiteRecoveryRpoOverThreshold"
T = TypeVar("T")


class MovableClock:
    """Real time plus ``ahead`` seconds."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def clocked_cs(tmp_path: Path) -> AsyncIterator[tuple[ConfigServer, MovableClock]]:
    clock = MovableClock()
    server = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"), clock=clock)
    await server.start()
    try:
        yield server, clock
    finally:
        await server.stop()


@asynccontextmanager
async def running_prometheus(tmp_path: Path, configserver: str, procserver: str
                             ) -> AsyncIterator[str]:
    """Debian's Prometheus scraping both targets every second with a copy of
    deploy/prometheus's config and rules (``for: 5m`` shortened to ``for: 2s``); its
    HTTP API's URL."""
    exe = shutil.which("prometheus")
    if exe is None:
        missing_backend("prometheus", "apt-get install prometheus (tests/run.sh does)")
    rules = (DEPLOY / "rules" / "siterecovery.yml").read_text()
    assert "for: 5m" in rules
    (tmp_path / "rules.yml").write_text(rules.replace("for: 5m", "for: 2s"))
    conf = (DEPLOY / "prometheus.yml").read_text().replace("30s", "1s")
    conf = conf.replace("rules/siterecovery.yml", str(tmp_path / "rules.yml"))
    conf = conf.replace('"127.0.0.1:9440"', f'"{configserver}"')
    conf = conf.replace('"127.0.0.1:9444"', f'"{procserver}"')
    (tmp_path / "prometheus.yml").write_text(conf)
    listen = f"127.0.0.1:{_free_port()}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(exe), f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={listen}",
            stdout=asyncio.subprocess.DEVNULL, stderr=log)
        try:
            yield f"http://{listen}"
        finally:
            proc.terminate()
            await proc.wait()


async def until(check: Callable[[], Awaitable[T | None]], what: str, log: Path,
                timeout: float = 30.0) -> T:
    """Ask ``check`` every 0.2 s (Prometheus announces nothing) until it answers; fail
    after ``timeout`` with the end of Prometheus's log."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if (got := await check()) is not None:
                    return got
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{what}; prometheus.log:\n{log.read_text()[-3000:]}") from None


async def test_the_rpo_alert_fires_when_an_agent_stops(
        clocked_cs: tuple[ConfigServer, MovableClock], tmp_path: Path) -> None:
    cs, clock = clocked_cs
    log = tmp_path / "prometheus.log"
    async with ApiClient(cs.url, cs.admin_token) as api:
        await api.post("/api/v1/policies", {
            "name": "tight", "rpo_threshold_seconds": 60,
            "crash_consistent_interval_seconds": 30, "app_consistent_frequency_seconds": 0})
        async with managed_site(cs, api, tmp_path, policy="tight",
                                procserver={"policy_interval_seconds": 1.0}) as site:
            assert await site.managed.round()  # the initial copy: web01 has a point
            async with running_prometheus(
                    tmp_path, f"127.0.0.1:{cs.port}", f"127.0.0.1:{site.ps.metrics_port}"
            ) as prom, aiohttp.ClientSession() as http:

                async def api_get(path: str) -> Any:
                    try:
                        async with http.get(prom + path) as r:
                            return (await r.json())["data"] if r.status == 200 else None
                    except aiohttp.ClientError:  # not listening yet
                        return None

                async def ratio() -> float | None:
                    # Both sides of the alert's expression are scraped, from the
                    # configuration server and from the process server.
                    data = await api_get(
                        "/api/v1/query?query=siterecovery:item_rpo_ratio")
                    res = (data or {}).get("result", [])
                    return float(res[0]["value"][1]) if res else None

                async def rpo_alerts() -> list[dict[str, Any]]:
                    data = await api_get("/api/v1/alerts")
                    return [a for a in (data or {}).get("alerts", [])
                            if a["labels"]["alertname"] == ALERT]

                # While the agent replicates, web01 is inside its RPO: no alert.
                assert await site.managed.round()
                assert await until(ratio, "web01's RPO ratio recorded", log) < 1
                assert await rpo_alerts() == []

                # The agent stops; 90 s pass without a point (threshold 60 s).
                clock.ahead = 90.0

                async def firing() -> list[dict[str, Any]] | None:
                    alerts = [a for a in await rpo_alerts() if a["state"] == "firing"
                              and a["labels"]["severity"] == "warning"]
                    return alerts or None

                (alert,) = await until(firing, f"{ALERT} firing", log)
                assert alert["labels"]["machine"] == "web01"
                assert float(alert["value"]) > 1.4  # 90 s and more over a 60 s threshold
                assert alert["annotations"]["summary"] == (
                    "web01: RPO over its policy's threshold")
                # Prometheus evaluated every rule against the real series without error.
                groups = (await api_get("/api/v1/rules"))["groups"]
                assert [r["name"] for g in groups for r in g["rules"]
                        if r["health"] == "err"] == []
