"""The new fingerprint map a cycle builds, in a memory-mapped file (#16, mobility/newmap.py):
the agent's map files after full, delta and resync cycles are byte for byte the
fingerprints of the disk's blocks (what the whole bytearray held); a cycle that fails
after it began its map leaves a part file that the next committed state removes; and
what a cycle holds in memory (tracemalloc's peak, the process server in the same process
included) does not grow with the disk where a whole map would."""

from __future__ import annotations

import random
import shutil
import tracemalloc
from pathlib import Path

import pytest

from common.digest import fingerprint
from mobility.agent import Agent
from mobility.newmap import PART
from mobility.tracker import load_state
from tests.helpers import (
    BLOCK,
    Pki,
    agent_config,
    make_agent,
    make_disk,
    mutate,
    point_restores_to,
    proc_config,
    running_procserver,
    sha256,
)

SIZE = (3 << 20) + 777  # a short last block


class _Stop(Exception):
    """Raised by a progress callback: the cycle fails in the middle of its scan."""


def _fps(data: bytes) -> bytes:
    return b"".join(fingerprint(data[o:o + BLOCK]) for o in range(0, len(data), BLOCK))


def _map_of(agent: Agent, disk: str) -> bytes:
    state = load_state(agent.state_dir)
    assert state is not None
    return (agent.state_dir / state.disks[disk].map_file).read_bytes()


async def test_map_files_after_full_delta_and_resync_cycles(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_disk(a, SIZE, seed=81)
    make_disk(b, 1 << 20, seed=82)
    async with running_procserver(proc_config(tmp_path, pki, url, key)) as ps:
        cfg = agent_config(tmp_path, pki, "web01", ps.port, {"sda": a, "sdb": b})
        agent = make_agent(cfg)
        try:
            kinds = []
            for step in range(4):
                if step == 2:
                    shutil.rmtree(agent.state_dir)  # the maps lost: a resync
                if step:
                    mutate(a, 0.1, seed=83 + step, zero_share=0.3)
                r = await agent.replicate_once()
                kinds.append(r.kind)
                await ps.wait_point(r.cycle, timeout=60)
                for name, path in (("sda", a), ("sdb", b)):
                    assert _map_of(agent, name) == _fps(path.read_bytes()), (step, name)
                assert sorted(p.name for p in agent.state_dir.glob("*.fp")) == sorted(
                    f"{n}.{r.cycle}.fp" for n in ("sda", "sdb"))
            assert kinds == ["full", "delta", "resync", "delta"]
            await point_restores_to(ps, tmp_path, key, r.cycle,
                                    {"sda": sha256(a), "sdb": sha256(b)})

            # A cycle failing in its scan leaves its part files; the next one removes them.
            mutate(a, 0.1, seed=90)

            def stop(disk: str, done: int, total: int) -> None:
                raise _Stop

            with pytest.raises(_Stop):
                await agent.replicate_once(stop)
            assert list(agent.state_dir.glob(f"*{PART}"))
            # (acknowledged: its point may wait behind the abandoned cycle's, not waited for)
            r = await agent.replicate_once()
            assert r.kind == "delta" and _map_of(agent, "sda") == _fps(a.read_bytes())
            assert not list(agent.state_dir.glob(f"*{PART}"))
        finally:
            agent.close()


def _sparse(path: Path, nblocks: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(nblocks * BLOCK)
        for n in range(5, nblocks, 2999):
            f.seek(n * BLOCK)
            f.write(rng.randbytes(BLOCK))


async def test_a_cycles_memory_does_not_grow_with_the_disk(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """Sparse disks of 2^14 and 2^16 blocks (1 and 4 GiB; whole maps of 256 KiB and
    1 MiB): the peak of a full copy and of a delta, in bytes."""
    url, key = vault_at
    sizes = {"small01": 1 << 14, "big01": 1 << 16}
    peaks: dict[tuple[str, str], int] = {}
    async with running_procserver(proc_config(tmp_path, pki, url, key)) as ps:
        for i, (machine, nblocks) in enumerate(sizes.items()):
            path = tmp_path / f"{machine}.img"
            _sparse(path, nblocks, seed=91 + i)
            agent = make_agent(agent_config(tmp_path, pki, machine, ps.port, {"sda": path}))
            try:
                for step in range(2):
                    if step:
                        with open(path, "r+b") as f:
                            f.seek(7 * BLOCK)
                            f.write(b"y" * BLOCK)
                    tracemalloc.start()
                    try:
                        r = await agent.replicate_once()
                        peak = tracemalloc.get_traced_memory()[1]
                    finally:
                        tracemalloc.stop()
                    peaks[machine, r.kind] = peak
                    await ps.wait_point(r.cycle, timeout=120)
                    assert _map_of(agent, "sda") == _fps(path.read_bytes())
            finally:
                agent.close()
    print(f"peak bytes: {peaks}")
    grown = 16 * (sizes["big01"] - sizes["small01"])  # what a whole map would add: 768 KiB
    for kind in ("full", "delta"):
        assert peaks["big01", kind] - peaks["small01", kind] < grown / 2, peaks
