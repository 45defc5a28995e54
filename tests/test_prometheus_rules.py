"""deploy/prometheus/: the rules pass ``promtool check`` and their unit tests
(``promtool test rules``); deploy/grafana/: every dashboard query parses; and every metric
the rules and the queries name is one a running configuration server or process server
really exposes (or a recording rule defines)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from configserver.server import ConfigServer
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.test_procservers import beat, post_beat

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = DEPLOY / "rules" / "siterecovery.yml"
DASHBOARDS = sorted((DEPLOY.parent / "grafana").glob("*.json"))
METRIC = re.compile(r"\b(siterecovery_[a-z0-9_]+)\b")
RECORDED = re.compile(r"\b(siterecovery:[a-z0-9_:]+)")
BUILTIN = {"up"}  # Prometheus's own series
T = TypeVar("T")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        missing_backend("promtool", "apt-get install prometheus (tests/run.sh does)")
    return subprocess.run([str(tool), *args], capture_output=True, text=True, cwd=DEPLOY,
                          timeout=120)


def test_rules_and_scrape_config_pass_promtool_check() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_unit_tests_pass() -> None:
    tests = sorted((DEPLOY / "tests").glob("*.yml"))
    assert tests
    r = promtool("test", "rules", *map(str, tests))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def rule_metrics() -> set[str]:
    """The metric names the rules read (comments aside; recording rules' own names have a
    colon, so the pattern does not take them)."""
    lines = [ln for ln in RULES.read_text().splitlines() if not ln.lstrip().startswith("#")]
    return set(METRIC.findall("\n".join(lines)))


def exposed(text: str) -> set[str]:
    """Every series name a /metrics page can carry, from its ``# TYPE`` lines (present
    even for a labelled metric without children yet)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _h, _t, name, kind = line.split()
            names.add(name)
            if kind == "counter":
                names |= {f"{name}_total", f"{name}_created"}
            elif kind in ("histogram", "summary"):
                names |= {f"{name}_{s}" for s in ("bucket", "sum", "count", "created")}
    return names


async def test_every_metric_in_the_rules_is_exposed(cs: ConfigServer,
                                                    procserver: ProcServer) -> None:
    pages = []
    async with aiohttp.ClientSession() as http:
        for url in (f"{cs.url}/metrics", f"http://127.0.0.1:{procserver.metrics_port}/metrics"):
            async with http.get(url) as r:
                assert r.status == 200
                pages.append(await r.text())
    have = exposed(pages[0]) | exposed(pages[1])
    used = rule_metrics()
    assert {"siterecovery_configserver_item_rpo_seconds",
            "siterecovery_procserver_item_rpo_threshold_seconds"} <= used
    assert used - have == set(), "the rules name metrics no service exposes"
    queries = dashboard_queries()
    in_queries = {m for q in queries for m in METRIC.findall(q)}
    assert in_queries - have == set(), "the dashboard names metrics no service exposes"
    records = set(re.findall(r"record: (siterecovery:[a-z0-9_:]+)", RULES.read_text()))
    assert {r for q in queries for r in RECORDED.findall(q)} - records == set(), \
        "the dashboard uses recording rules deploy/prometheus does not define"


def dashboard_queries() -> list[str]:
    assert DASHBOARDS, "deploy/grafana/ has no dashboard"
    out = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        for panel in doc["panels"]:
            assert panel["targets"], panel["title"]
            out += [t["expr"] for t in panel["targets"]]
    return out


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a throwaway recording rule."""
    rules = tmp_path / "queries.yml"
    rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard_query_{i}", "expr": q}
        for i, q in enumerate(dashboard_queries())]}]}))
    r = promtool("check", "rules", str(rules))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["siterecovery_configserver_item_rpo_seconds",
                                  "siterecovery_procserver_received_bytes_total"])
def test_exposed_reads_type_lines(name: str) -> None:
    page = ("# HELP siterecovery_configserver_item_rpo_seconds x\n"
            "# TYPE siterecovery_configserver_item_rpo_seconds gauge\n"
            "# TYPE siterecovery_procserver_received_bytes counter\n")
    assert name in exposed(page)
    assert "siterecovery_configserver_item_rpo" not in exposed(page)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def prometheus(tmp_path: Path, cs: ConfigServer, procserver: ProcServer
                     ) -> AsyncIterator[str]:
    """A real Prometheus (Debian's) scraping ``cs`` and ``procserver`` every second with
    deploy/prometheus/rules; its HTTP API URL."""
    exe = shutil.which("prometheus")
    if exe is None:
        missing_backend("prometheus", "apt-get install prometheus (tests/run.sh does)")
    conf = (DEPLOY / "prometheus.yml").read_text()
    conf = conf.replace("30s", "1s").replace("rules/siterecovery.yml", str(RULES))
    conf = conf.replace('"127.0.0.1:9440"', f'"127.0.0.1:{cs.port}"')
    conf = conf.replace('"127.0.0.1:9444"', f'"127.0.0.1:{procserver.metrics_port}"')
    (tmp_path / "prometheus.yml").write_text(conf)
    port = _free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(exe), f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=log)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            await proc.wait()


async def _until(check: Callable[[], Awaitable[T | None]], what: str, log: Path) -> T:
    """Ask ``check`` once a second (Prometheus scrapes and evaluates every second and
    announces nothing) until it answers; fail after 60 s with the server's log."""
    try:
        async with asyncio.timeout(60):
            while True:
                if (got := await check()) is not None:
                    return got
                await asyncio.sleep(1)
    except TimeoutError:
        raise AssertionError(f"{what}; prometheus.log:\n{log.read_text()[-3000:]}") from None


async def test_a_real_prometheus_scrapes_the_services_and_fires(
        prometheus: str, cs: ConfigServer, tmp_path: Path) -> None:
    log = tmp_path / "prometheus.log"

    async def api(path: str) -> Any:
        try:
            async with aiohttp.ClientSession() as http, http.get(prometheus + path) as r:
                return (await r.json())["data"] if r.status == 200 else None
        except aiohttp.ClientError:  # not listening yet
            return None

    async def both_up() -> list[Any] | None:
        data = await api("/api/v1/targets")
        up = [t for t in (data or {}).get("activeTargets", []) if t["health"] == "up"]
        return up if len(up) == 2 else None

    await _until(both_up, "both services scraped", log)
    groups = (await _until(lambda: api("/api/v1/rules"), "rules loaded", log))["groups"]
    assert {g["name"] for g in groups} == {"siterecovery-recording", "siterecovery-alerts"}
    # a cache below 25 %: the configuration server raises its alert, Prometheus sees it
    status, body = await post_beat(cs, beat(cache_free_ratio=0.2))
    assert status == 200, body

    async def firing() -> list[Any] | None:
        data = await api("/api/v1/alerts")
        alerts = [a for a in (data or {}).get("alerts", []) if a["state"] == "firing"
                  and a["labels"]["alertname"] == "SiteRecoveryConfigServerAlert"]
        return alerts or None

    (alert,) = await _until(firing, "SiteRecoveryConfigServerAlert firing", log)
    assert (alert["labels"]["code"], alert["labels"]["severity"]) == (
        "procserver_cache_free_low", "critical")

    async def pending() -> list[Any] | None:
        data = await api("/api/v1/alerts")
        return [a for a in (data or {}).get("alerts", [])
                if a["labels"]["alertname"] == "SiteRecoveryProcServerCacheLow"] or None

    # its own rule reads the gauge and waits its 5 minutes
    cache = await _until(pending, "SiteRecoveryProcServerCacheLow pending", log)
    assert {(a["labels"]["severity"], a["state"]) for a in cache} == {
        ("warning", "pending"), ("critical", "pending")}
    # every rule evaluates without error against the real series
    rules = (await api("/api/v1/rules"))["groups"]
    assert [r["name"] for g in rules for r in g["rules"] if r["health"] == "err"] == []


async def test_each_server_exposes_its_certificates_not_after(
        cs: ConfigServer, procserver: ProcServer) -> None:
    """The gauges hold the not-after times of the certificate files each server uses."""

    def not_after(path: str | Path) -> float:
        return x509.load_pem_x509_certificate(Path(path).read_bytes()
                                              ).not_valid_after_utc.timestamp()

    async with aiohttp.ClientSession() as http:
        got: dict[tuple[str, str], float] = {}
        for url in (f"{cs.url}/metrics", f"http://127.0.0.1:{procserver.metrics_port}/metrics"):
            async with http.get(url) as r:
                for fam in text_string_to_metric_families(await r.text()):
                    if fam.name.endswith("_certificate_not_after_timestamp_seconds"):
                        got |= {(s.name.split("_")[1], s.labels["certificate"]): s.value
                                for s in fam.samples}
    assert got == {
        ("configserver", "site"): not_after(Path(cs.cfg.data_dir) / "tls" / "site.pem"),
        ("configserver", "ca"): not_after(cs.ca.cert_path),
        ("procserver", "server"): not_after(procserver.cfg.tls_cert),
        ("procserver", "ca"): not_after(procserver.cfg.tls_ca),
    }
    # a year ahead or more: nothing to warn about on a fresh installation
    assert min(got.values()) - time.time() > 300 * 86400
