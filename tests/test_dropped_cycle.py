"""A cycle the uploader drops while it is still being received is refused while it is sent.

The uploader drops a cycle that can never become a point (``procserver/uploader.py``:
the point it builds on, or blocks it names, left the vault). It used to do so behind the
session's back: the session went on receiving, and its END marked the dropped cycle
complete and acknowledged it — a promise of a point that could never be (the uploader
then retried it forever, holding up the machine's later cycles). Then the END found the
cycle dropped, but only after the agent had sent all of it, into a cache folder the
uploader had deleted under the session's writer. Now the uploader hands the cycle to its
session (``CycleBook.drop``), which answers ``cycle_dropped`` at the agent's next frame
and deletes the cache once its writer has stopped: no ACK, no point, nothing left in the
cache or the database, and the agent's next cycle, a resync, restores byte for byte.

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
from procserver.server import ProcServer
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
from tests.test_resume import frame_bytes, proxied, random_disk, replicate
from vault import names
from vault.locks import locked
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

            sent: list[int] = []

            def base_goes(_disk: str, done: int, _size: int) -> None:
                sent.append(done)
                # once the cycle has begun (its base was there then), what it builds on
                # leaves the vault
                (tmp_path / "vault" / (names.POINTS + base)).unlink(missing_ok=True)

            def received() -> float:
                return ps.metrics.registry.get_sample_value(
                    "siterecovery_procserver_received_bytes_total") or 0.0

            before = received()
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
                # refused while it was sent (the agent paced, waiting to send its second
                # half), not after the whole disk and its END
                assert sent and max(sent) < SIZE, sent
                assert received() - before < SIZE
            finally:
                agent.close()
            async with ps.sessionmaker() as s:
                row = (await s.execute(select(db.Cycle).where(db.Cycle.id == dropped))
                       ).scalar_one()
                assert (row.state, row.point_id) == (db.ABORTED, None)
                assert (await s.execute(select(db.Segment).where(
                    db.Segment.cycle_seq == row.seq))).first() is None
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
    assert [e.get("reason", "")[:8] for e in logs
            if e["event"] == "cycle_aborted" and e["cycle"] == dropped] == ["dropped:"]
    vault = await open_vault(tmp_path / "vault", key)
    try:
        got = await vault.read_point(point)
        assert await restore_all(vault, got, tmp_path / "restore") == {"sda": sha256(disk)}
    finally:
        await vault.close()


async def test_a_suspended_cycle_the_uploader_drops_is_aborted_at_once(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """A cycle whose session broke off (suspended, kept for its agent to resume) and that
    the uploader then finds can never become a point is aborted there and then: its cache
    goes, and it no longer waits out the resume window as a cycle that could resume."""
    url, key = vault_at
    disk = tmp_path / "disk.img"
    random_disk(disk, 4 << 20, seed=43)
    cfg = proc_config(tmp_path, pki, url, key, segment_bytes=1 << 20)
    with structlog.testing.capture_logs() as logs:
        async with running_procserver(cfg) as ps, proxied(ps) as proxy:
            acfg = agent_config(tmp_path, pki, "web01", proxy.port, {"sda": disk},
                                snapshot="quiesced", resume_timeout_seconds=0.0)
            first = await replicate(make_agent(acfg))
            base = await ps.wait_point(first.cycle, timeout=60)
            with open(disk, "r+b") as f:  # every block differs: a delta of the whole disk
                f.write(random.Random(44).randbytes(4 << 20))
            vault = await open_vault(tmp_path / "vault", key)
            try:
                # No upload while the cycle is sent and suspended: the uploader waits for
                # the vault, as it would behind a prune.
                async with locked(vault, "exclusive", "prune", wait=30):
                    proxy.cuts = [proxy.up + frame_bytes(4 << 20) // 2]
                    with pytest.raises((ConnectionError, OSError)):
                        await replicate(make_agent(acfg))
                    async with asyncio.timeout(30), ps.cycles.changed:
                        await ps.cycles.changed.wait_for(lambda: ps.cycles.suspended() == 1)
                    (tmp_path / "vault" / (names.POINTS + base)).unlink()
                async with asyncio.timeout(60), ps.cycles.changed:
                    await ps.cycles.changed.wait_for(lambda: ps.cycles.suspended() == 0)
            finally:
                await vault.close()
            dropped = await _dropped_without_a_trace(ps, base)
    assert any(e["event"] == "cycle_unrecoverable" and e["cycle"] == dropped for e in logs)
    assert [e.get("reason", "")[:8] for e in logs
            if e["event"] == "cycle_aborted" and e["cycle"] == dropped] == ["dropped:"]


async def test_a_cycle_waiting_for_cache_space_is_refused_when_dropped(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """A cycle larger than the cache fills it and waits for the uploader to drain it. When
    the uploader then drops it, the space it waits for is its own, which only its abort
    frees: the wait is refused (``cycle_dropped``) instead of lasting for ever."""
    url, key = vault_at
    disk = tmp_path / "disk.img"
    random_disk(disk, SIZE, seed=45)
    cfg = proc_config(tmp_path, pki, url, key, segment_bytes=1 << 20,
                      cache_quota_bytes=2 << 20)
    with structlog.testing.capture_logs() as logs:
        async with running_procserver(cfg) as ps:
            acfg = agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk},
                                snapshot="quiesced")
            first = await replicate(make_agent(acfg))
            base = await ps.wait_point(first.cycle, timeout=60)
            with open(disk, "r+b") as f:  # every block differs: a delta of 8 MiB
                f.write(random.Random(46).randbytes(SIZE))
            vault = await open_vault(tmp_path / "vault", key)
            agent = make_agent(acfg)
            try:
                # Nothing drains while the lock is held: the cycle fills the cache.
                async with locked(vault, "exclusive", "prune", wait=30):
                    seen = len(logs)  # the first cycle filled the cache too
                    task = asyncio.ensure_future(agent.replicate_once())
                    end = time.monotonic() + 60
                    while not any(e["event"] == "cache_full_backpressure"
                                  for e in logs[seen:]):
                        assert not task.done(), "the cycle ended before the cache filled"
                        assert time.monotonic() < end, "the cache never filled"
                        await asyncio.sleep(0.02)
                    (tmp_path / "vault" / (names.POINTS + base)).unlink()
                with pytest.raises(RemoteError) as refused:
                    async with asyncio.timeout(60):
                        await task
                assert refused.value.code == "cycle_dropped", refused.value
            finally:
                agent.close()
                await vault.close()
            await _dropped_without_a_trace(ps, base)


async def _dropped_without_a_trace(ps: ProcServer, base: str) -> str:
    """The first cycle is point ``base``, the second aborted with nothing of it left in
    the database or the cache; the second's id."""
    async with ps.sessionmaker() as s:
        rows = (await s.execute(select(db.Cycle).order_by(db.Cycle.seq))).scalars().all()
        assert [(r.state, r.point_id) for r in rows] == [
            (db.UPLOADED, base), (db.ABORTED, None)]
        assert (await s.execute(select(db.Segment))).first() is None
    assert not (ps.cache_dir / "web01" / rows[1].id).exists()
    assert ps.space.used == 0
    return rows[1].id
