"""Scale: 50 agents with one disk each replicate at once through one process server.

The process server runs as a real daemon so its peak memory (VmHWM) is its own;
every machine's points restore byte for byte, and the peak is reported.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.helpers import (
    Daemon,
    Pki,
    agent_config,
    make_agent,
    make_disk,
    mutate,
    open_vault,
    restore_all,
    sha256,
    write_toml,
)

AGENTS = 50
DISK = 4 << 20
PEAK_RSS_LIMIT = 512 << 20


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.slow
async def test_fifty_agents_converge_through_one_process_server(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    cert, pkey = pki.server()
    cfg = write_toml(tmp_path / "procserver.toml", {
        "data_dir": str(tmp_path / "procserver"), "vault_url": url,
        "vault_key_file": str(key), "tls_cert": cert, "tls_key": pkey, "tls_ca": pki.ca_path,
        "listen_port": 0, "metrics_port": 0, "cache_quota_bytes": 256 << 20,
        "segment_bytes": 16 << 20})
    ps = Daemon(["procserver", "run", "--config", str(cfg)], "procserver_started")
    ready = await ps.start()
    assert ps.proc is not None
    port = int(str(ready["port"]))
    machines = [f"m{i:02d}" for i in range(AGENTS)]
    disks = {m: tmp_path / "disks" / f"{m}.img" for m in machines}
    (tmp_path / "disks").mkdir()
    for i, m in enumerate(machines):
        make_disk(disks[m], DISK, seed=1000 + i)
    agents = {m: make_agent(agent_config(tmp_path, pki, m, port, {"sda": disks[m]}))
              for m in machines}
    expected: dict[str, dict[str, str]] = {m: {} for m in machines}

    async def cycle(m: str) -> None:
        r = await agents[m].replicate_once()
        expected[m][r.cycle] = sha256(disks[m])

    try:
        await asyncio.gather(*(cycle(m) for m in machines))  # 50 initial copies at once
        for i, m in enumerate(machines):
            mutate(disks[m], 0.1, seed=2000 + i)
        await asyncio.gather(*(cycle(m) for m in machines))  # and 50 deltas
        await ps.wait_events("point_uploaded", 2 * AGENTS, timeout=600)
        peak = _peak_rss(ps.proc.pid)
    finally:
        for a in agents.values():
            a.close()
        await ps.stop()
    print(f"\nprocess server peak RSS with {AGENTS} agents: {peak / 2**20:.1f} MiB")
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.1f} MiB"
    vault = await open_vault(tmp_path / "vault", key)
    try:
        for m in machines:
            points = await vault.list_points(m)
            assert [p.cycle for p in points] == list(expected[m])
            for p in points:
                assert await restore_all(vault, p, tmp_path / "out") == {
                    "sda": expected[m][p.cycle]}
    finally:
        await vault.close()
