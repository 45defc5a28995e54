"""A prune completes while an agent is mid-cycle (#17): the uploader holds its shared
vault lock only while the cycle has something in the vault, not while it waits for
segments still being received. Both results are exact: the prune's, and every point of
the agent's, which restore byte-exact; ``check --read-data`` is clean."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import select

from common.pacing import TokenBucket
from procserver import db as pdb
from procserver.server import ProcServer
from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    make_disk,
    mutate,
    open_vault,
    restore_all,
    sha256,
)
from vault.check import check_vault
from vault.keyslots import KeyMaterial, read_keyfile
from vault.locks import locked
from vault.prune import prune
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
