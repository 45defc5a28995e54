"""A cycle the uploader drops while it is still being received is refused at its END.

The uploader drops a cycle that can never become a point (``procserver/uploader.py``:
the point it builds on, or blocks it names, left the vault). It used to do so behind the
session's back: the session went on receiving, and its END marked the dropped cycle
complete and acknowledged it — a promise of a point that could never be (the uploader
then retried it forever, holding up the machine's later cycles). Now the END finds the
cycle dropped and answers ``cycle_dropped``: no ACK, no point, nothing left in the cache,
and the agent's next cycle, a resync, restores byte for byte.

Real process server, real agent (paced, so that it is still sending when the drop
comes), a real vault whose base point is removed the way a hand or a damaged store would
remove it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from pathlib import Path

import pytest
import structlog
from sqlalchemy import select

from procserver import db
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
from vault import names
from wire.protocol import RemoteError

SIZE = 8 << 20
PACE_MBPS = 8.0  # the delta of the whole disk takes about 8 s to send


async def test_a_cycle_dropped_while_received_is_refused_at_its_end(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    disk = tmp_path / "disk.img"
    random_disk(disk, SIZE, seed=41)
    cfg = proc_config(tmp_path, pki, url, key, segment_bytes=1 << 20)
    with structlog.testing.capture_logs() as logs:
        async with running_procserver(cfg) as ps:
            acfg = agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk},
                                snapshot="quiesced")
            agent = make_agent(acfg)
            try:
                first = await agent.replicate_once()
            finally:
                agent.close()
            base = await ps.wait_point(first.cycle, timeout=60)
            with open(disk, "r+b") as f:  # every block differs: a long delta
                f.write(random.Random(42).randbytes(SIZE))

            def base_goes(_disk: str, _done: int, _size: int) -> None:
                # once the cycle has begun (its base was there then), what it builds on
                # leaves the vault
                (tmp_path / "vault" / (names.POINTS + base)).unlink(missing_ok=True)

            slow = dataclasses.replace(acfg, send_limit_work_mbps=PACE_MBPS,
                                       send_limit_off_mbps=PACE_MBPS)
            agent = make_agent(slow)
            try:
                task = asyncio.ensure_future(agent.replicate_once(base_goes))
                end = time.monotonic() + 60
                while True:  # until the uploader has dropped the cycle being received
                    async with ps.sessionmaker() as s:
                        rows = (await s.execute(select(db.Cycle.id, db.Cycle.state).where(
                            db.Cycle.id != first.cycle))).all()
                    if rows and rows[0][1] == db.ABORTED:
                        break
                    assert not task.done(), f"the cycle ended before it was dropped: {rows}"
                    assert time.monotonic() < end, rows
                    await asyncio.sleep(0.02)
                dropped = rows[0][0]
                assert not task.done(), "the drop came after the agent's END"
                with pytest.raises(RemoteError) as refused:
                    await task
                assert refused.value.code == "cycle_dropped", refused.value
            finally:
                agent.close()
            async with ps.sessionmaker() as s:
                row = (await s.execute(select(db.Cycle).where(db.Cycle.id == dropped))
                       ).scalar_one()
                assert (row.state, row.point_id) == (db.ABORTED, None)
            assert not (ps.cache_dir / "web01" / dropped).exists()
            assert ps.space.used == 0

            # the next cycle: refused as a delta on the lost point, resynced whole
            agent = make_agent(acfg)
            try:
                again = await agent.replicate_once()
                if not again.full:  # refused as a delta: the agent resyncs
                    again = await agent.replicate_once()
            finally:
                agent.close()
            assert again.full, again
            point = await ps.wait_point(again.cycle, timeout=60)
    assert [e["cycle"] for e in logs if e["event"] == "cycle_acknowledged"] == [
        first.cycle, again.cycle]
    assert any(e["event"] == "cycle_unrecoverable" and e["cycle"] == dropped for e in logs)
    vault = await open_vault(tmp_path / "vault", key)
    try:
        got = await vault.read_point(point)
        assert await restore_all(vault, got, tmp_path / "restore") == {"sda": sha256(disk)}
    finally:
        await vault.close()
