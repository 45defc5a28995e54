"""A cycle its agent abandoned never holds up the machine's next point (the RPO gap).

An agent resumes only the cycle it is sending (``mobility/resume.py``): once it has
begun a newer cycle, an older one of its machine can never be resumed. The process
server aborts such a cycle when the newer BEGIN arrives (``CycleBook.supersede``) or
when its session suspends it after that BEGIN (``CycleBook.suspend``). Between the two
was a gap: a BEGIN that arrived while the old session was still letting go of its cycle
(sealed, checked for a newer cycle, not yet released) skipped it, and the session had
already looked. The cycle then stayed suspended for ``resume_window_seconds``, and the
uploader, which takes a machine's cycles in order, kept the newer acknowledged cycle
from becoming a point until the window passed.

Each test pins that interleaving with the real process server: it holds the cycle book's
``changed`` lock, so the old session stops right after marking its cycle suspended (its
cycle still held), runs the new cycle to its ACK, then lets go. With an hour's resume
window, the new point must be uploaded at once, restore byte for byte, and the abandoned
cycle must leave no point, no cache files and a ``cycle_aborted`` (``superseded``) line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import select

from mobility.agent import CycleResult
from mobility.config import MobilityConfig
from procserver import db
from procserver.cycles import OpenCycle
from procserver.server import ProcServer
from tests.helpers import (
    REPO,
    Pki,
    agent_config,
    make_agent,
    open_vault,
    proc_config,
    restore_all,
    running_procserver,
    sha256,
    write_toml,
)
from tests.test_resume import frame_bytes, proxied, random_disk, replicate

SIZE = 8 << 20  # two 4 MiB chunks of the agent's reads
HOUR = 3600.0


class ReadFailed(Exception):
    """The agent's cycle fails in the middle of its reads (not a connection error)."""


async def _until(what: Callable[[], bool], deadline: float = 30.0) -> None:
    """Wait until ``what()`` holds (state of the real server), at most ``deadline`` s."""
    end = time.monotonic() + deadline
    while not what():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def _suspended(ps: ProcServer) -> OpenCycle | None:
    return next((oc for oc in ps.cycles.open.values() if oc.suspended_at is not None), None)


async def _abandoned_then_new(tmp: Path, pki: Pki, vault_at: tuple[str, Path],
                              abandon: Callable[[ProcServer, MobilityConfig],
                                                Awaitable[None]]) -> None:
    url, key = vault_at
    disk = tmp / "disk.img"
    random_disk(disk, SIZE, seed=31)
    cfg = proc_config(tmp, pki, url, key, resume_window_seconds=HOUR, segment_bytes=1 << 20)
    with structlog.testing.capture_logs() as logs:
        async with running_procserver(cfg) as ps:
            acfg = agent_config(tmp, pki, "web01", ps.port, {"sda": disk},
                                snapshot="quiesced")
            async with ps.cycles.changed:  # a session that suspends a cycle stops there
                await abandon(ps, acfg)
                await _until(lambda: _suspended(ps) is not None)
                old = _suspended(ps)
                assert old is not None and old.frames > 0 and old.owner is not None
                r = await replicate(make_agent(acfg))
                assert r.full and r.resumes == 0
            # Let go: the abandoned cycle is aborted, the new one is uploaded at once (an
            # hour's resume window would otherwise hold it up).
            point_id = await _alone_uploaded(ps, old, r, timeout=60)
    await _superseded_and_restored(logs, old, r, point_id, tmp, key, disk)


async def _alone_uploaded(ps: ProcServer, old: OpenCycle, r: CycleResult,
                          timeout: float) -> str:
    """The new cycle's point, once uploaded: the old cycle aborted, nothing of it left."""
    point_id = await ps.wait_point(r.cycle, timeout=timeout)
    async with ps.sessionmaker() as s:
        states = dict((await s.execute(select(db.Cycle.id, db.Cycle.state))).all())
    assert states == {old.id: db.ABORTED, r.cycle: db.UPLOADED}
    assert not (ps.cache_dir / "web01" / old.id).exists()
    assert ps.cycles.suspended() == 0 and ps.space.used == 0
    return point_id


async def _superseded_and_restored(logs: list[MutableMapping[str, Any]], old: OpenCycle,
                                   r: CycleResult, point_id: str, tmp: Path, key: Path,
                                   disk: Path) -> None:
    """The old cycle was aborted as superseded; the vault holds the new point alone, and it
    restores byte for byte."""
    aborted = [e for e in logs if e["event"] == "cycle_aborted"]
    assert [(e["cycle"], e["reason"]) for e in aborted] == [(old.id, "superseded")]
    vault = await open_vault(tmp / "vault", key)
    try:
        points = await vault.list_points("web01")
        assert [(p.id, p.cycle) for p in points] == [(point_id, r.cycle)]
        assert await restore_all(vault, points[0], tmp / "restore") == {"sda": sha256(disk)}
    finally:
        await vault.close()


async def test_failed_cycle_then_a_new_one_uploads_at_once(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """The agent's cycle fails half-way through its reads (its connection closed, no
    resume: the failure is not the network's) and the agent begins a fresh cycle."""

    async def abandon(_ps: ProcServer, acfg: MobilityConfig) -> None:
        def fail_half_way(_disk: str, done: int, size: int) -> None:
            if done >= size // 2:
                raise ReadFailed("read error")

        agent = make_agent(acfg)
        try:
            with pytest.raises(ReadFailed):
                await agent.replicate_once(fail_half_way)
        finally:
            agent.close()

    await _abandoned_then_new(tmp_path, pki, vault_at, abandon)


async def test_agent_killed_mid_cycle_then_a_new_one_uploads_at_once(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """``kill -9`` of the agent's process while the process server holds part of its
    cycle; the restarted agent begins a new cycle."""

    async def abandon(ps: ProcServer, acfg: MobilityConfig) -> None:
        # Paced (16 Mbit/s), so that it is still sending when it is killed.
        slow = dataclasses.replace(acfg, send_limit_work_mbps=16.0, send_limit_off_mbps=16.0)
        fields = {f.name: getattr(slow, f.name) for f in dataclasses.fields(slow)}
        conf = write_toml(Path(acfg.state_dir).parent / "mobility.toml", fields)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "siterecovery", "mobility", "replicate", "--config",
            str(conf), "--json", cwd=REPO, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            await _until(lambda: any(oc.frames > 0 for oc in ps.cycles.open.values()), 60)
        finally:
            proc.kill()
            await proc.wait()

    await _abandoned_then_new(tmp_path, pki, vault_at, abandon)


async def test_a_new_cycle_cuts_the_half_open_session_of_an_older_one(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """The agent's connection goes silent in the middle of a cycle (a dead path: no reset
    reaches either side) and the agent starts over on another connection. The process
    server's session of the old cycle still waits for its frames: with an hour's idle
    timeout it would hold the new cycle's point back for an hour (the uploader takes a
    machine's cycles in order). The new BEGIN cuts that session instead, as a RESUME
    would: the old cycle is aborted as superseded, the new one uploaded at once."""
    url, key = vault_at
    disk = tmp_path / "disk.img"
    random_disk(disk, SIZE, seed=37)
    cfg = proc_config(tmp_path, pki, url, key, resume_window_seconds=HOUR,
                      idle_timeout_seconds=HOUR, segment_bytes=1 << 20)
    with structlog.testing.capture_logs() as logs:
        async with running_procserver(cfg) as ps, proxied(ps) as proxy:
            proxy.stall_at = frame_bytes(SIZE) // 2
            acfg = agent_config(tmp_path, pki, "web01", proxy.port, {"sda": disk},
                                snapshot="quiesced", resume_timeout_seconds=0.0)
            first = make_agent(acfg)
            sending = asyncio.create_task(first.replicate_once())
            try:
                await _until(lambda: proxy.up >= frame_bytes(SIZE) // 2 and any(
                    oc.frames > 0 and oc.owner is not None for oc in ps.cycles.open.values()))
            finally:  # the agent gives the dead connection up
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
                first.close()
            (old,) = ps.cycles.open.values()
            assert old.owner is not None and not old.owner.done()  # still attached
            r = await replicate(make_agent(dataclasses.replace(acfg, server_port=ps.port)))
            assert r.full and r.resumes == 0
            point_id = await _alone_uploaded(ps, old, r, timeout=30)
    assert [e["cycle"] for e in logs if e["event"] == "cycle_session_cut"] == [old.id]
    await _superseded_and_restored(logs, old, r, point_id, tmp_path, key, disk)
