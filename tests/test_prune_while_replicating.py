"""A prune completes while an agent is mid-cycle (#17): the uploader holds its shared
vault lock only while it writes, not while it waits for segments still being received.
Both results are exact: the prune's, and every point of the agent's, which restore
byte-exact; ``check --read-data`` is clean.

Mid-cycle with segments already checkpointed, the cycle's lease (vault/locks.py) keeps
what it wrote and the blocks it found stored (here: blocks only a point being pruned
holds) from the prune; the lock's waits and acquisitions are in the metrics."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from common.pacing import TokenBucket
from procserver import db as pdb
from procserver.server import ProcServer
from tests.helpers import (
    BLOCK,
    Pki,
    agent_config,
    make_agent,
    make_disk,
    mutate,
    open_vault,
    proc_config,
    restore_all,
    running_procserver,
    sha256,
    write_full_point,
)
from vault.check import check_vault
from vault.indexopen import estimate_blocks
from vault.keyslots import KeyMaterial, read_keyfile
from vault.locks import (
    LEASE_TTL,
    LEASES,
    LeaseChangedError,
    Leases,
    delete_lease,
    leased_blocks,
    locked,
    put_lease_part,
    read_leases,
)
from vault.prune import prune
from vault.prunestream import PER_BLOCK, fits_in_memory
from vault.retention import Retention
from vault.store.local import LocalStore

SIZE = 8 << 20


class GatedBucket:
    """The agent's real send limit, which also stops before a frame once ``after`` bytes
    went through, until ``go`` is set: the agent is paused between two frames."""

    def __init__(self, real: TokenBucket, after: int) -> None:
        self.real, self.after, self.sent = real, after, 0
        self.paused, self.go = asyncio.Event(), asyncio.Event()

    async def take(self, n: int) -> None:
        if self.sent >= self.after and not self.go.is_set():
            self.paused.set()
            await self.go.wait()
        self.sent += n
        await self.real.take(n)


async def test_prune_completes_while_an_agent_is_mid_cycle(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path]) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, SIZE, seed=3)
    agent = make_agent(agent_config(tmp_path, pki, "web01", procserver.port, {"sda": disk}))
    expected: dict[str, str] = {}
    ids: list[str] = []
    try:
        for i in range(3):  # a full point and two deltas, all uploaded
            if i:
                mutate(disk, 0.05, seed=i)
            r = await agent.replicate_once()
            expected[r.cycle] = sha256(disk)
            ids.append(await procserver.wait_point(r.cycle))
        mutate(disk, 0.05, seed=9)
        want_last = sha256(disk)
        gate = GatedBucket(agent.send_limit, after=64 << 10)
        agent.send_limit = gate  # type: ignore[assignment]
        cycle = asyncio.create_task(agent.replicate_once())
        await asyncio.wait([cycle, asyncio.ensure_future(gate.paused.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        assert gate.paused.is_set() and not cycle.done()
        async with procserver.sessionmaker() as s:
            states = (await s.execute(select(pdb.Cycle.state))).scalars().all()
        assert pdb.RECEIVING in states  # the process server is mid-cycle too

        # The prune: forget the first two points (keep-all window 0: the newest stays),
        # under the exclusive lock, while the agent's cycle is open.
        vault = await open_vault(tmp_path / "vault", vault_at[1])
        try:
            async with locked(vault, "exclusive", "prune", wait=30):
                with ThreadPoolExecutor(2) as ex:
                    report = await prune(vault, Retention(0, 0, 0, 0), ex)
            assert not cycle.done()  # it ran while the agent was paused mid-cycle
            first = list(expected)
            assert sorted(report.forgotten) == sorted(ids[:2])
            gate.go.set()
            last = await cycle
            await procserver.wait_point(last.cycle)
            expected[last.cycle] = want_last
            points = await vault.list_points("web01")
            assert [p.cycle for p in points] == [first[2], last.cycle]
            for p in points:
                assert await restore_all(vault, p, tmp_path / "out") == {
                    "sda": expected[p.cycle]}
        finally:
            await vault.close()
    finally:
        agent.close()
    report2 = await check_vault(LocalStore(tmp_path / "vault"),
                                KeyMaterial(keyfile=read_keyfile(vault_at[1])), read_data=True)
    assert report2.errors == [], report2.errors


async def lock_metrics(ps: ProcServer) -> dict[str, float]:
    """The process server's vault-lock samples of mode ``shared``, by sample name."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{ps.metrics_port}/metrics") as r:
        text = await r.text()
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if "vault_lock" in s.name
            and s.labels.get("mode", "shared") == "shared" and "le" not in s.labels}


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0
                ) -> None:
    """Poll ``check()`` every 20 ms until it is true (nothing announces these states);
    fail after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


async def test_prune_between_checkpoints_keeps_what_the_cycle_wrote(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    # 1 MiB segments: the cycle in progress has several, checkpointed one by one.
    cfg = proc_config(tmp_path, pki, *vault_at, segment_bytes=1 << 20)
    disk = tmp_path / "disk.img"
    size = 16 << 20  # four of the agent's 4 MiB chunks: it pauses before the third
    make_disk(disk, size, seed=5)
    original = disk.read_bytes()
    expected: dict[str, str] = {}
    async with running_procserver(cfg) as ps:
        agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
        try:
            ids = []
            for i in range(3):  # a full point and two deltas, all uploaded
                if i:
                    mutate(disk, 0.25, seed=i, zero_share=0)
                r = await agent.replicate_once()
                expected[r.cycle] = sha256(disk)
                ids.append(await ps.wait_point(r.cycle))
            # Blocks only the first point holds now (overwritten since): three of them are
            # written back, at the start of the disk, so the next cycle finds them stored
            # (no pack of its own holds them) and sends them in its first segments.
            now = disk.read_bytes()
            only_first = [n for n in range(size // BLOCK)
                          if original[n * BLOCK:(n + 1) * BLOCK] != now[n * BLOCK:(n + 1) * BLOCK]]
            revert = only_first[:3]
            mutate(disk, 0.5, seed=9, zero_share=0)
            with open(disk, "r+b") as f:
                for n in revert:
                    f.seek(n * BLOCK)
                    f.write(original[n * BLOCK:(n + 1) * BLOCK])
            want_last = sha256(disk)
            gate = GatedBucket(agent.send_limit, after=3 << 20)
            agent.send_limit = gate  # type: ignore[assignment]
            cycle = asyncio.create_task(agent.replicate_once())
            await asyncio.wait([cycle, asyncio.ensure_future(gate.paused.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            assert gate.paused.is_set() and not cycle.done()

            vault = await open_vault(tmp_path / "vault", vault_at[1])
            try:
                reverted = {vault.keyring.block_id(original[n * BLOCK:(n + 1) * BLOCK])
                            for n in revert}
                leases = Leases()
                leased: set[bytes] = set()

                async def checkpointed() -> bool:
                    # The reverted blocks are journaled (so leased) and every sealed
                    # segment is checkpointed: the cycle waits for the agent.
                    nonlocal leases, leased
                    leases = await read_leases(vault)
                    leased = {b async for ids in leased_blocks(vault, leases) for b in ids}
                    async with ps.sessionmaker() as s:
                        segs = (await s.execute(select(func.count()).select_from(
                            pdb.Segment))).scalar_one()
                    return reverted <= leased and segs == 0

                await until(checkpointed, "the first segments checkpointed")
                assert leases.cycles and len(leased) > len(reverted)
                before = await lock_metrics(ps)
                async with locked(vault, "exclusive", "prune", wait=30):
                    with ThreadPoolExecutor(2) as ex:
                        report = await prune(vault, Retention(0, 0, 0, 0), ex)
                    assert not cycle.done()  # it ran while the agent was paused mid-cycle
                    assert report.cycles_in_progress == 1
                    assert sorted(report.forgotten) == sorted(ids[:2])
                    assert report.packs_deleted > 0
                    # The agent goes on; its next segment waits for the lock we hold.
                    gate.go.set()

                    async def waiting() -> bool:
                        m = await lock_metrics(ps)
                        return m["siterecovery_procserver_vault_lock_waiting"] == 1

                    await until(waiting, "the upload waiting for the vault lock")
                async with asyncio.timeout(120):
                    last = await cycle
                    await ps.wait_point(last.cycle)
                expected[last.cycle] = want_last
                after = await lock_metrics(ps)
                points = await vault.list_points("web01")
                assert [p.cycle for p in points] == [list(expected)[2], last.cycle]
                for p in points:
                    assert await restore_all(vault, p, tmp_path / "out") == {
                        "sda": expected[p.cycle]}
            finally:
                await vault.close()
        finally:
            agent.close()
    # The lock was let go while the cycle waited and taken again after the prune, which
    # the upload waited for; every acquisition's wait is observed.
    taken = (after["siterecovery_procserver_vault_lock_acquisitions_total"]
             - before["siterecovery_procserver_vault_lock_acquisitions_total"])
    assert taken >= 1
    assert after["siterecovery_procserver_vault_lock_wait_seconds_count"] == (
        after["siterecovery_procserver_vault_lock_acquisitions_total"])
    assert (after["siterecovery_procserver_vault_lock_wait_seconds_sum"]
            > before["siterecovery_procserver_vault_lock_wait_seconds_sum"])
    # The lease went with the point.
    assert not list((tmp_path / "vault" / LEASES).rglob("*")) or not any(
        p.is_file() for p in (tmp_path / "vault" / LEASES).rglob("*"))
    report2 = await check_vault(LocalStore(tmp_path / "vault"),
                                KeyMaterial(keyfile=read_keyfile(vault_at[1])), read_data=True)
    assert report2.errors == [], report2.errors


@pytest.mark.parametrize("memory", [None, 1 << 10], ids=["in-memory", "streaming"])
async def test_prune_keeps_what_live_leases_hold_and_deletes_expired_ones(
        tmp_path: Path, vault_at: tuple[str, Path], memory: int | None) -> None:
    """The vault alone: a live lease keeps its base point (retention would forget it) and
    its blocks (only a forgotten point holds them); an expired lease keeps nothing and is
    deleted, as is a part that fails to authenticate."""
    rng = random.Random(7)
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    try:
        data = {key: rng.randbytes(4 * BLOCK) for key in ("m1c1", "m1c2", "m2c1", "m2c2")}
        p = {key: await write_full_point(vault, d, machine=key[:2], cycle=key[2:])
             for key, d in data.items()}
        block = {key: [vault.keyring.block_id(d[n * BLOCK:(n + 1) * BLOCK]) for n in range(4)]
                 for key, d in data.items()}
        # m1's cycle c3 builds on its first point; m2's c3 found a block of m2's first point
        # stored; m2's c0 was abandoned two days ago (its lease expired).
        await put_lease_part(vault, "m1", "c3", p["m1c1"].id, [])
        await put_lease_part(vault, "m2", "c3", p["m2c2"].id, [block["m2c1"][0]])
        await put_lease_part(vault, "m2", "c0", p["m2c1"].id, block["m2c1"],
                             now=time.time() - 2 * LEASE_TTL)
        await vault.store.put(f"{LEASES}{'ab' * 32}/{'cd' * 32}", b"not a sealed lease part")
        with ThreadPoolExecutor(2) as ex:
            report = await prune(vault, Retention(0, 0, 0, 0), ex, memory=memory,
                                 temp_dir=tmp_path)
        assert report.kept[p["m1c1"].id] == "base of a cycle in progress"
        assert report.forgotten == [p["m2c1"].id]
        assert report.cycles_in_progress == 2 and report.leases_deleted == 2
        index = await vault.load_index()
        assert block["m2c1"][0] in index  # leased: kept, though its point is forgotten
        assert not any(b in index for b in block["m2c1"][1:])  # collected
        leases = await read_leases(vault)
        assert leases.cycles == {("m1", "c3"), ("m2", "c3")}
        assert leases.expired == [] and leases.bad == []
        for q in (p["m1c1"], p["m1c2"], p["m2c2"]):  # every kept point restores exactly
            got = await restore_all(vault, q, tmp_path / "out")
            assert got == {"sda": hashlib.sha256(data[q.machine + q.cycle]).hexdigest()}
        # Once the cycles end, their leases go.
        assert await delete_lease(vault, "m1", "c3") == 1
        assert await delete_lease(vault, "m2", "c3") == 1
        assert await read_leases(vault) == Leases()
    finally:
        await vault.close()


async def test_a_lease_is_read_a_part_at_a_time(tmp_path: Path,
                                                vault_at: tuple[str, Path]) -> None:
    # A long cycle's lease: many parts of many blocks. Reading the leases holds a part,
    # not their blocks; the blocks come back a part at a time, all of them.
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    try:
        ids = [i.to_bytes(32, "little") for i in range(8 * 40_000)]
        for k in range(8):
            await put_lease_part(vault, "m1", "c1", None, ids[k * 40_000:(k + 1) * 40_000])
        tracemalloc.start()
        try:
            leases = await read_leases(vault)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert leases.cycles == {("m1", "c1")} and len(leases.live) == 8
        assert leases.blocks == 8 * 40_000
        # The in-memory collection's estimate counts them: a budget the vault's own
        # blocks fit is not enough with the leased ones in the live set too.
        budget = await estimate_blocks(vault) * PER_BLOCK
        assert await fits_in_memory(vault, budget)
        assert not await fits_in_memory(vault, budget, leases.blocks)
        # A part is 1.3 MB, held as it was read and as opened (2.6 MB; the read's future
        # may keep the last part's bytes until a collection): the eight parts are 10 MB,
        # their blocks' set was ~35 MB.
        assert peak < 4 << 20, peak
        parts = [p async for p in leased_blocks(vault, leases)]
        assert [len(p) for p in parts] == [40_000] * 8
        assert sorted(b for p in parts for b in p) == sorted(ids)
        # Gone between the two reads (no writer can: a prune holds the vault alone):
        # an error, not a prune that keeps too little.
        await vault.store.delete(leases.live[3])
        with pytest.raises(LeaseChangedError, match=r"vanished.*run the prune again"):
            _ = [p async for p in leased_blocks(vault, leases)]
    finally:
        await vault.close()
