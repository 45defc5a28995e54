"""deploy/prometheus/: the rules pass ``promtool check`` and their unit tests
(``promtool test rules``); deploy/grafana/: every dashboard query parses; and every metric
the rules and the queries name is one a running configuration server or process server
really exposes (or a recording rule defines)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from configserver.server import ConfigServer
from procserver.server import ProcServer
from tests.backends import missing_backend

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = DEPLOY / "rules" / "siterecovery.yml"
DASHBOARDS = sorted((DEPLOY.parent / "grafana").glob("*.json"))
METRIC = re.compile(r"\b(siterecovery_[a-z0-9_]+)\b")
RECORDED = re.compile(r"\b(siterecovery:[a-z0-9_:]+)")
BUILTIN = {"up"}  # Prometheus's own series


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
