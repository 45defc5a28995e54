"""The agent's metrics file (``metrics_file``): Prometheus's text format, accepted by
``promtool check metrics``, rewritten after every cycle with what the cycle did."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mobility.metricsfile import AgentMetrics
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import Pki, agent_config, make_agent, make_disk, mutate

SIZE = 8 << 20


def _samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = path.read_text()
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_backend("promtool", "tests/run.sh installs prometheus")
    assert promtool is not None
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _one(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
         **labels: str) -> float:
    return samples[(f"siterecovery_agent_{name}",
                    tuple(sorted({"machine": "vm01", **labels}.items())))]


async def test_each_cycle_rewrites_the_metrics_file(tmp_path: Path, pki: Pki,
                                                    procserver: ProcServer) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, SIZE, seed=1)
    prom = tmp_path / "textfile" / "agent.prom"
    prom.parent.mkdir()
    cfg = agent_config(tmp_path, pki, "vm01", procserver.port, {"sda": disk},
                       metrics_file=str(prom))
    agent = make_agent(cfg)
    try:
        full = await agent.replicate_once()
        m = _samples(prom)
        assert _one(m, "cycles_total", kind="full") == 1
        assert _one(m, "cycles_total", kind="delta") == 0
        assert _one(m, "sent_bytes_total") == full.bytes_sent > 0
        assert _one(m, "last_cycle_read_bytes") == full.bytes_read
        assert _one(m, "disk_tracker_info", disk="sda", tracker="scan") == 1
        assert _one(m, "disk_verified_timestamp_seconds", disk="sda") > 1.7e9
        assert _one(m, "last_cycle_hold_seconds") <= _one(m, "last_cycle_duration_seconds")
        assert prom.stat().st_mode & 0o777 == 0o644  # a scraper of another user reads it

        changed = mutate(disk, 0.05, seed=2, zero_share=0.0)  # every pick now differs
        delta = await agent.replicate_once()
        m = _samples(prom)
        assert _one(m, "cycles_total", kind="delta") == 1
        assert _one(m, "last_cycle_blocks") == delta.blocks_sent == len(changed)
        assert _one(m, "sent_bytes_total") == full.bytes_sent + delta.bytes_sent
        assert _one(m, "read_bytes_total") == full.bytes_read + delta.bytes_read
    finally:
        agent.close()
    assert not list(prom.parent.glob(".*"))  # no temporary file left for the collector


def test_failures_are_counted_by_error_type(tmp_path: Path) -> None:
    m = AgentMetrics("vm01", tmp_path / "agent.prom")
    m.cycle_failed("ConnectionRefusedError")
    m.cycle_failed("ConnectionRefusedError")
    m.cycle_failed("ProtocolError")
    samples = _samples(tmp_path / "agent.prom")
    assert _one(samples, "cycle_failures_total", error_type="ConnectionRefusedError") == 2
    assert _one(samples, "cycle_failures_total", error_type="ProtocolError") == 1
    assert not any(name.startswith("siterecovery_agent_last_") for name, _ in samples)


@pytest.mark.parametrize("machine", ['we"b\\01\n'])
def test_label_values_are_escaped(tmp_path: Path, machine: str) -> None:
    m = AgentMetrics(machine, tmp_path / "agent.prom")
    m.write()
    fams = list(text_string_to_metric_families((tmp_path / "agent.prom").read_text()))
    assert {s.labels["machine"] for f in fams for s in f.samples} == {machine}
