"""Many sessions at once whose open segments alone fill the cache quota.

The uploader drains only sealed segments, and a segment is sealed when it reaches
``segment_bytes`` or at its cycle's SYNC or END. Four agents sending at once into a cache
whose quota holds two segments fill it with four half-full open segments: each session
waits for room only another's upload could free, and none of them has a segment to
upload. A session that finds no room seals its open segment first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    open_vault,
    proc_config,
    restore_all,
    running_procserver,
    sha256,
)
from tests.test_resume import random_disk

SEGMENT = 8 << 20
MACHINES = ("web01", "web02", "web03", "web04")


async def test_sessions_whose_open_segments_fill_the_quota_seal_them_and_all_land(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    cfg = proc_config(tmp_path, pki, url, key, segment_bytes=SEGMENT,
                      cache_quota_bytes=2 * SEGMENT)
    disks = {m: tmp_path / f"{m}.img" for m in MACHINES}
    for i, path in enumerate(disks.values()):
        random_disk(path, 3 * SEGMENT, seed=60 + i)  # all of it cached
    with structlog.testing.capture_logs() as logs:
        async with running_procserver(cfg) as ps:
            agents = [make_agent(agent_config(tmp_path, pki, m, ps.port, {"sda": p}))
                      for m, p in disks.items()]
            try:
                async with asyncio.timeout(60):
                    results = await asyncio.gather(*(a.replicate_once() for a in agents))
                    points = [await ps.wait_point(r.cycle) for r in results]
            finally:
                for a in agents:
                    a.close()
            assert ps.space.used == 0
    early = [e for e in logs if e["event"] == "segment_sealed_early"]
    assert early, "the quota was never full: the test proves nothing"
    vault = await open_vault(tmp_path / "vault", key)
    try:
        for m, point_id in zip(MACHINES, points, strict=True):
            point = await vault.read_point(point_id)
            assert point.machine == m
            assert await restore_all(vault, point, tmp_path / "out" / m) == {
                "sda": sha256(disks[m])}
    finally:
        await vault.close()
