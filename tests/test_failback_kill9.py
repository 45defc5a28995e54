"""kill -9 during failback and during re-protect: resumed, nothing lost, digests exact.

Every part real (``tests/failbacksite.py``): a ``configserver run`` and the agent's
``mobility run`` are killed with SIGKILL at moments chosen by real conditions — the
failback's write step showing the agent's progress past 60 % (its writes paced by the
policy's bandwidth limit, so that they take seconds), a re-protect's step waiting for the
vault (held by the test), the agent's first cycle after the failback sending (paced by
the same limit) — then started again:

- the configuration server killed while a re-protect takes the recovered machine's
  disks: the job resumes at its step, the point is a delta on the failover point (no full
  copy) and restores byte for byte;
- the configuration server killed while the agent writes a failback onto the original
  disk: the agent writes on, keeps its answer until the restarted server's resumed job
  takes it, and the counts are the failback's;
- the agent killed in the middle of the failback's writes: the restarted agent compares
  again and writes only the blocks that still differ (never one twice), and the job ends
  with the whole failback's counts;
- the agent killed in its first cycle after the failback (re-protect in the original
  direction): the next cycle is a delta, and its point restores byte for byte; the
  configuration server killed meanwhile: the agent replicates a delta on its last known
  settings, and the point reaches the restarted server.

In each the original disk ends equal to the failback point byte for byte, and the point
in the vault restores to it. The configuration server's kills run on SQLite and on
PostgreSQL (a resumed job reads what its killed predecessor committed there).
(Re-protect in the reverse direction has no agent here: the folder target's images are
read on the host by the configuration server.)
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from mobility.failbackrequest import RESULT
from mobility.inplace import failback_pending
from tests.failbacksite import KillSite, failed_over_site
from tests.helpers import open_vault, restore_all, sha256
from tests.sitehelpers import step, wait_job
from tests.test_failback_job import _asking, _differing, _fsck_clean, _write
from vault.locks import Lock, try_acquire

pytestmark = pytest.mark.root
DISK = 16 << 20
RATE_MBPS = 1.0  # the policy's bandwidth limit while the failback writes: seconds of writes
LIMIT = {"send_limit": {"work_mbps": RATE_MBPS, "off_mbps": RATE_MBPS}}


def _writing(job: dict[str, Any]) -> bool:
    """The agent reported its writes under way (the compare is the first half)."""
    return float(step(job, "write_back")["progress"] or 0) >= 60.0


async def _restores_to(site: KillSite, point: str, want: str, out: str) -> None:
    """``point`` (in the vault) restores to a disk whose sha256 is ``want``."""
    vault = await open_vault(site.tmp / "vault", site.key)
    try:
        got = await restore_all(vault, await vault.read_point(point), site.tmp / out)
    finally:
        await vault.close()
    assert got == {"sda": want}


async def _business_on_the_recovered_machine(site: KillSite, bs: int) -> tuple[bytes, int]:
    """Files written on the recovered machine, the original lies stale: the recovered
    disk, and how many blocks the failback has to write."""
    _write(site.recovered, "orders.db", os.urandom(900_000))
    _write(site.disk, "stale.tmp", os.urandom(50_000))
    want = site.recovered.read_bytes()
    expected = _differing(site.disk.read_bytes(), want, bs)
    assert expected > 8
    return want, expected


async def test_kill9_of_the_configuration_server_during_reprotect_and_failback(
        tmp_path: Path, catalog_url: str) -> None:
    async with failed_over_site(tmp_path, catalog_url) as site:
        async with site.api() as api:
            bs = (await api.get("/api/v1/policies/default"))["block_size"]
            failover_point = (await api.get("/api/v1/items/web01"))["failover"]["point"]

        # Re-protect, the server killed while its step waits for the vault (held here).
        at_failover = site.recovered.read_bytes()
        _write(site.recovered, "early.db", os.urandom(400_000))
        changed = _differing(at_failover, site.recovered.read_bytes(), bs)
        vault = await open_vault(tmp_path / "vault", site.key)
        held: Lock | None = None
        try:
            got = await try_acquire(vault, "exclusive", "test: a prune")
            assert isinstance(got, Lock)
            held = got
            async with site.api() as api:
                jid = (await api.post("/api/v1/items/web01/reprotect", {}))["job"]["id"]
                await site.cs.wait_events("vault_locked_waiting", 1)
                before = await api.get(f"/api/v1/jobs/{jid}")
                assert step(before, "take")["state"] == "running", before
            await site.cs.kill9()
            await site.start_cs()
            (resumed,) = await site.cs.wait_events("job_resumed", 1)
            assert (resumed["job"], resumed["attempts"]) == (jid, 2)
            await held.release()
            held = None
        finally:
            if held is not None:
                await held.release()
            await vault.close()
        async with site.api() as api:
            done = await wait_job(api, jid, timeout=120)
            assert done["state"] == "succeeded" and done["attempts"] == 2, done
            assert step(done, "prerequisites")["attempts"] == 1
            assert step(done, "take")["attempts"] == 2
            assert (f"{changed} block(s) stored as a delta on point {failover_point}"
                    in step(done, "take")["message"])  # no full copy
            item = await api.get("/api/v1/items/web01")
            assert (item["state"], item["direction"]) == ("reprotected", "reverse")
            rp = item["failover"]["reprotect"]
            assert (rp["points"], rp["last_full"], rp["last_blocks_stored"]) == (1, False,
                                                                                 changed)
        await _restores_to(site, rp["last_point"], sha256(site.recovered), "out-reprotect")

        # Failback, the server killed while the agent writes the original disk.
        want, expected = await _business_on_the_recovered_machine(site, bs)
        async with site.api() as api:
            await api.call("PATCH", "/api/v1/policies/default", LIMIT)
            jid = (await api.post("/api/v1/items/web01/failback", {}))["job"]["id"]
            await wait_job(api, jid, _asking, timeout=120)
            writing = asyncio.create_task(site.managed.round())
            await wait_job(api, jid, _writing, timeout=120)
        await site.cs.kill9()
        left = _differing(site.disk.read_bytes(), want, bs)
        assert 0 < left < expected, "killed before or after the writes"
        # The agent writes on; its answer cannot be delivered and is kept.
        assert not await writing
        assert site.disk.read_bytes() == want
        assert (Path(site.cfg.state_dir) / RESULT).exists()
        assert failback_pending(site.cfg.state_dir) is None  # the disks hold the point

        await site.start_cs()
        (resumed,) = await site.cs.wait_events("job_resumed", 1)
        assert (resumed["job"], resumed["attempts"]) == (jid, 2)
        async with site.api() as api:
            assert (await api.get("/api/v1/items/web01"))["state"] == "failback_in_progress"
            assert not await site.managed.round()  # the kept answer, nothing written again
            done = await wait_job(api, jid, timeout=120)
            assert done["state"] == "succeeded" and done["attempts"] == 2, done
            assert step(done, "take_disks")["attempts"] == 1  # done before the kill
            assert step(done, "write_back")["attempts"] == 2
            assert (f"{expected} of {DISK // bs} block(s) differed and were written"
                    in step(done, "write_back")["message"])
            item = await api.get("/api/v1/items/web01")
            fb = item["failover"]["failback"]
            assert (item["state"], fb["result"], fb["blocks_written"]) == (
                "protected", "succeeded", expected)
        assert not (Path(site.cfg.state_dir) / RESULT).exists()
        assert site.disk.read_bytes() == want and _fsck_clean(site.disk)
        await _restores_to(site, fb["point"], sha256(site.disk), "out-failback")
        assert not site.recovered.parent.exists()

        # Re-protected in the original direction: a delta on the failback point.
        assert await site.managed.round()
        last = site.managed.last
        assert last is not None and (last.kind, last.blocks_sent) == ("delta", 0)

        # The configuration server killed again while the original machine replicates
        # (its last known settings): a delta of the changes, whose point reaches the
        # restarted server and restores byte for byte.
        _write(site.disk, "after.db", os.urandom(300_000))
        changed = _differing(want, site.disk.read_bytes(), bs)
        await site.cs.kill9()
        assert await site.managed.round()
        last = site.managed.last
        assert last is not None and (last.kind, last.blocks_sent) == ("delta", changed)
        pid = await site.ps.wait_point(last.cycle, timeout=120)
        await site.start_cs()
        n = 1  # (a point reported before the kill may come first)
        while pid not in {e["point"] for e in await site.cs.wait_events("point_recorded", n)}:
            n += 1
        async with site.api() as api:
            assert (await api.get("/api/v1/items/web01"))["latest_point"] == pid
        await _restores_to(site, pid, sha256(site.disk), "out-after")


# The agent's kills matter to the agent, not to the catalog: SQLite only (the
# configuration server's kills above run on both catalogs).
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_kill9_of_the_agent_during_failback_and_during_reprotect(
        tmp_path: Path, catalog_url: str) -> None:
    async with failed_over_site(tmp_path, catalog_url) as site:
        async with site.api() as api:
            bs = (await api.get("/api/v1/policies/default"))["block_size"]
        want, expected = await _business_on_the_recovered_machine(site, bs)
        state = Path(site.cfg.state_dir)
        state_before = (state / "state.json").read_text()

        # Failback, the agent (mobility run) killed in the middle of its writes.
        async with site.api() as api:
            await api.call("PATCH", "/api/v1/policies/default", LIMIT)
            jid = (await api.post("/api/v1/items/web01/failback", {}))["job"]["id"]
            await wait_job(api, jid, _asking, timeout=120)
            first = site.agent("failback_requested")
            await first.start()
            # The agent's daemon settled its start-up heap before its first round.
            [settled] = first.events("startup_heap_settled")
            assert int(str(settled["frozen_objects"])) > 20_000
            await wait_job(api, jid, _writing, timeout=120)
            await first.kill9()
            point = (await api.get("/api/v1/items/web01"))["failover"]["failback"]["point"]
        left = _differing(site.disk.read_bytes(), want, bs)
        assert 0 < left < expected, "killed before or after the writes"
        assert failback_pending(state) == point  # nothing may replicate the disks
        assert (state / "state.json").read_text() == state_before
        assert not (state / RESULT).exists()

        again = site.agent("failback_requested")
        await again.start()
        async with site.api() as api:
            done = await wait_job(api, jid, timeout=120)
            assert done["state"] == "succeeded" and done["attempts"] == 1, done
            assert (f"{expected} of {DISK // bs} block(s) differed and were written"
                    in step(done, "write_back")["message"])
            item = await api.get("/api/v1/items/web01")
            assert (item["state"], item["failover"]["failback"]["blocks_written"]) == (
                "protected", expected)
        (resumed,) = await again.wait_events("failback_resumed", 1)
        assert resumed["point"] == point
        # Compared again: only the blocks still differing were written, none twice.
        (disk,) = await again.wait_events("failback_disk_resumed", 1)
        assert (disk["blocks_written_now"], disk["blocks_written_before"]) == (
            left, expected - left)
        assert await again.stop() == 0
        assert site.disk.read_bytes() == want and _fsck_clean(site.disk)
        await _restores_to(site, point, sha256(site.disk), "out-failback")
        assert failback_pending(state) is None
        assert not list(state.glob("failback-plan.*"))

        # Re-protect in the original direction: the business writes on the original
        # machine; the agent is killed in its first cycle, before it is acknowledged.
        _write(site.disk, "after.db", os.urandom(600_000))
        changed = _differing(want, site.disk.read_bytes(), bs)
        third = site.agent("cycle_send_started")
        await third.start()
        (opened,) = third.events("cycle_opened")
        assert opened["kind"] == "delta"
        await third.kill9()
        assert third.events("cycle_committed") == []
        vault = await open_vault(tmp_path / "vault", site.key)
        try:
            assert opened["cycle"] not in {p.cycle for p in await vault.list_points("web01")}
        finally:
            await vault.close()

        fourth = site.agent("cycle_committed")
        committed = await fourth.start(timeout=120)
        assert committed["kind"] == "delta", committed  # no full copy, no resync
        assert committed["blocks"] == changed  # the changes since the failback, no more
        assert await fourth.stop() == 0
        pid = await site.ps.wait_point(str(committed["cycle"]))
        await _restores_to(site, pid, sha256(site.disk), "out-reprotect")
