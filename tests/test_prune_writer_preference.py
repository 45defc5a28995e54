"""A prune is not starved by uploads that never pause (#17): an exclusive contender
announces itself (an intent, vault/locks.py), the process server's shared lock yields
(procserver/vaultlock.py) and its uploads let go at their next checkpoint
(procserver/cycleupload.py). Results exact: the prune's, and every point of the agents,
which restore byte-exact; ``check --read-data`` is clean."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import select

from procserver import db as pdb
from procserver.metrics import ProcMetrics
from procserver.server import ProcServer
from procserver.vaultlock import SharedVaultLock
from tests.helpers import (
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
)
from tests.test_prune_while_replicating import until
from vault.check import check_vault
from vault.keyslots import KeyMaterial, read_keyfile
from vault.locks import INTENT, LockedError, acquire, list_locks, locked
from vault.prune import prune
from vault.retention import Retention
from vault.store.local import LocalStore


class _Vaults:
    """What SharedVaultLock uses of VaultAccess: the vault."""

    def __init__(self, vault: object) -> None:
        self.vault = vault


async def test_shared_holds_in_relay_yield_to_a_waiting_exclusive(
        tmp_path: Path, vault_at: tuple[str, Path]) -> None:
    """Holds handed on from one to the next never leave the lock free; an exclusive
    contender still gets in within a bounded time, and the holds go on after it."""
    mine = await open_vault(tmp_path / "vault", vault_at[1])
    prune_side = await open_vault(tmp_path / "vault", vault_at[1])
    shared = SharedVaultLock(_Vaults(mine), ProcMetrics(), wait=60,  # type: ignore[arg-type]
                             poll=0.1)
    handoffs = 0
    handed = asyncio.Event()
    stop = asyncio.Event()
    log: list[str] = []

    async def relay() -> None:
        nonlocal handoffs
        held = contextlib.AsyncExitStack()
        await held.enter_async_context(shared.hold("relay"))
        while not stop.is_set():
            if shared.yielding:  # what an upload does at its next checkpoint
                await held.aclose()
                log.append("let go")
            nxt = contextlib.AsyncExitStack()
            await nxt.enter_async_context(shared.hold("relay"))
            await held.aclose()  # handed on: the lock object stays
            held = nxt
            handoffs += 1
            handed.set()
            await asyncio.sleep(0)
        await held.aclose()

    try:
        task = asyncio.create_task(relay())
        await _handoffs(handed, lambda: handoffs >= 20)
        assert shared.held
        started = time.monotonic()
        async with locked(prune_side, "exclusive", "prune", wait=30):
            waited = time.monotonic() - started
            before = handoffs
            assert not shared.held and log == ["let go"]
            kinds = [lk.kind for lk in (await list_locks(prune_side))[0]]
            assert "exclusive" in kinds and INTENT not in kinds  # the intent went

        assert waited < 10, waited
        await _handoffs(handed, lambda: handoffs >= before + 20)  # it goes on after
        stop.set()
        await task
        assert not shared.held and not shared.yielding
        assert (await list_locks(prune_side))[0] == []
    finally:
        stop.set()
        await mine.close()
        await prune_side.close()


async def test_intent_keeps_new_shared_locks_out(tmp_path: Path,
                                                 vault_at: tuple[str, Path]) -> None:
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    try:
        async with locked(vault, "shared", "an upload"):
            contender = asyncio.create_task(acquire(vault, "exclusive", "prune", wait=30))
            async def announced() -> bool:
                return INTENT in [lk.kind for lk in (await list_locks(vault))[0]]
            await until(announced, "the exclusive contender's intent")
            try:
                await acquire(vault, "shared", "a new upload", wait=0)
                raise AssertionError("a shared lock was granted past a waiting exclusive one")
            except LockedError as e:
                assert "(intent)" in str(e)
        exclusive = await contender
        await exclusive.release()
        got = await acquire(vault, "shared", "a new upload", wait=0)
        await got.release()
        assert (await list_locks(vault))[0] == []
    finally:
        await vault.close()


async def test_prune_completes_while_agents_upload_continuously(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """Uploads throttled below what the agents send: web01's big cycle is uploaded with
    segments always waiting, so without writer preference its lock would not lapse
    before the whole cycle is in the vault; web02 replicates all along. The prune runs
    while web01's cycle is still being uploaded."""
    cfg = proc_config(tmp_path, pki, *vault_at, segment_bytes=1 << 20,
                      upload_limit_work_mbps=8.0, upload_limit_off_mbps=8.0)
    expected: dict[str, str] = {}
    stop = asyncio.Event()
    async with running_procserver(cfg) as ps:
        ps.uploader.vault_lock.poll = 0.2
        disks, agents = {}, {}
        # web01 sends six times faster than the uploads go; web02 a trickle.
        for i, (name, size, mbps) in enumerate((("web01", 6 << 20, 48.0),
                                                ("web02", 2 << 20, 4.0))):
            disks[name] = tmp_path / f"{name}.img"
            make_disk(disks[name], size, seed=40 + i)
            agents[name] = make_agent(agent_config(
                tmp_path, pki, name, ps.port, {"sda": disks[name]},
                send_limit_work_mbps=mbps, send_limit_off_mbps=mbps))

        async def cycle(name: str, seed: int, share: float) -> str:
            if seed:
                mutate(disks[name], share, seed=seed, zero_share=0)
            r = await agents[name].replicate_once()
            expected[r.cycle] = sha256(disks[name])
            return r.cycle

        async def web02() -> None:
            rnd = 2
            while not stop.is_set():
                await cycle("web02", rnd, 0.25)
                rnd += 1

        await ps.wait_point(await cycle("web01", 0, 0))
        for rnd in range(2):  # two points of web02 before: the prune forgets the first
            await ps.wait_point(await cycle("web02", rnd, 0.25))
        loop = asyncio.create_task(web02())
        big = asyncio.create_task(cycle("web01", 7, 1.0))  # every block changes
        try:
            await _backlogged(ps)
            vault = await open_vault(tmp_path / "vault", vault_at[1])
            try:
                started = time.monotonic()
                async with locked(vault, "exclusive", "prune", wait=60):
                    assert not ps.uploader.vault_lock.held
                    with ThreadPoolExecutor(2) as ex:
                        report = await prune(vault, Retention(0, 0, 0, 0), ex)
                waited = time.monotonic() - started
            finally:
                await vault.close()
            async with ps.sessionmaker() as s:
                pending = (await s.execute(select(pdb.Cycle.id).where(
                    pdb.Cycle.machine == "web01", pdb.Cycle.state != pdb.UPLOADED))
                ).scalars().all()
            assert pending, "web01's big cycle was uploaded before the prune got in"
            assert not loop.done()  # web02 kept replicating
        finally:
            stop.set()
            results = await asyncio.gather(loop, big, return_exceptions=True)
            for agent in agents.values():
                agent.close()
        assert results[0] is None and isinstance(results[1], str), results
        points = {cycle: await ps.wait_point(cycle) for cycle in expected}
    assert waited < 20, waited
    assert report.forgotten  # web02's older points
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    try:
        listed = [p for m in ("web01", "web02") for p in await vault.list_points(m)]
        assert {p.id for p in listed} == set(points.values()) - set(report.forgotten)
        for p in listed:
            assert await restore_all(vault, p, tmp_path / "out") == {"sda": expected[p.cycle]}
    finally:
        await vault.close()
    check = await check_vault(LocalStore(tmp_path / "vault"),
                              KeyMaterial(keyfile=read_keyfile(vault_at[1])), read_data=True)
    assert check.errors == [], check.errors


async def _backlogged(ps: ProcServer) -> None:
    """Until the uploader holds the lock with segments waiting behind the one it writes."""
    async def busy() -> bool:
        return ps.uploader.vault_lock.held and ps.space.used > (3 << 20)
    await until(busy, "an upload holding the lock with a backlog behind it")


async def _handoffs(handed: asyncio.Event, enough: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):
        while not enough():
            handed.clear()
            await handed.wait()
