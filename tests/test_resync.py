"""Resync against the vault: a lost agent map or a lost process-server cache costs the
differences, not the disks (the agent compares its disks with the fingerprints of the
vault's newest point, read back block by block, and sends a delta on that point)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mobility.agent import Agent, CycleResult
from procserver.server import ProcServer
from tests.helpers import (
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

SIZE = 24 << 20
CHANGED = 0.05


async def restores_exactly(ps: ProcServer, tmp: Path, key: Path, r: CycleResult,
                           disks: dict[str, Path]) -> None:
    await point_restores_to(ps, tmp, key, r.cycle,
                            {name: sha256(p) for name, p in disks.items()})


async def metric(ps: ProcServer, name: str) -> float:
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{ps.metrics_port}/metrics") as resp:
        text = await resp.text()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no metric {name}")


async def first_point(agent: Agent, ps: ProcServer) -> CycleResult:
    r = await agent.replicate_once()
    assert r.kind == "full"  # the vault holds nothing of this machine yet: no basis
    await ps.wait_point(r.cycle, timeout=60)
    return r


async def test_lost_agent_map_resends_only_the_differences(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path]) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_disk(a, SIZE, seed=1)
    make_disk(b, (3 << 20) + 4321, seed=2)  # a short last block
    disks = {"sda": a, "sdb": b}
    cfg = agent_config(tmp_path, pki, "web01", procserver.port, disks)
    agent = make_agent(cfg)
    try:
        await first_point(agent, procserver)
        shutil.rmtree(cfg.state_dir)  # the agent was reinstalled: its maps are gone
        mutate(a, CHANGED, seed=3, zero_share=0.3)
        with open(b, "r+b") as f:
            f.seek((3 << 20) + 4000)
            f.write(b"new tail")
        r = await agent.replicate_once()
        assert r.kind == "resync" and not r.full
        # Only what differs from the vault's point crossed the wire.
        assert 0 < r.bytes_sent <= (CHANGED + 0.02) * SIZE
        await restores_exactly(procserver, tmp_path, vault_at[1], r, disks)
        assert await metric(procserver, "siterecovery_procserver_resync_bases_total") == 1
        # The agent has its maps again: the next cycle is an ordinary delta.
        mutate(a, 0.01, seed=4)
        r2 = await agent.replicate_once()
        assert r2.kind == "delta" and r2.bytes_sent <= 0.03 * SIZE
        await restores_exactly(procserver, tmp_path, vault_at[1], r2, disks)
    finally:
        agent.close()


async def test_unchanged_disks_after_a_lost_map_send_nothing(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path]) -> None:
    disk = tmp_path / "d.img"
    make_disk(disk, 8 << 20, seed=9)
    cfg = agent_config(tmp_path, pki, "db01", procserver.port, {"sda": disk})
    agent = make_agent(cfg)
    try:
        await first_point(agent, procserver)
        shutil.rmtree(cfg.state_dir)
        r = await agent.replicate_once()
        assert (r.kind, r.blocks_sent, r.bytes_sent) == ("resync", 0, 0)
        await restores_exactly(procserver, tmp_path, vault_at[1], r, {"sda": disk})
    finally:
        agent.close()


async def test_lost_process_server_cache_resyncs_against_the_vault(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    disk = tmp_path / "d.img"
    make_disk(disk, SIZE, seed=5)
    async with running_procserver(proc_config(tmp_path / "old", pki, url, key)) as old:
        cfg = agent_config(tmp_path, pki, "app01", old.port, {"sda": disk})
        agent = make_agent(cfg)
        try:
            await first_point(agent, old)
        finally:
            agent.close()
    # The process server's cache disk is gone: a new one, empty, on the same vault.
    shutil.rmtree(tmp_path / "old")
    mutate(disk, CHANGED, seed=6)
    async with running_procserver(proc_config(tmp_path / "new", pki, url, key)) as new:
        agent = make_agent(dataclasses.replace(cfg, server_port=new.port))
        try:
            # The agent's base is unknown here: refused, then a delta on the vault's point.
            r = await agent.replicate_once()
            assert r.kind == "resync"
            assert 0 < r.bytes_sent <= (CHANGED + 0.02) * SIZE
            await restores_exactly(new, tmp_path, key, r, {"sda": disk})
            mutate(disk, 0.01, seed=7)
            r2 = await agent.replicate_once()
            assert r2.kind == "delta"
            await restores_exactly(new, tmp_path, key, r2, {"sda": disk})
        finally:
            agent.close()


async def test_another_disk_layout_falls_back_to_a_full_cycle(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path]) -> None:
    disk = tmp_path / "d.img"
    make_disk(disk, 8 << 20, seed=11)
    cfg = agent_config(tmp_path, pki, "grow01", procserver.port, {"sda": disk})
    agent = make_agent(cfg)
    try:
        await first_point(agent, procserver)
        shutil.rmtree(cfg.state_dir)
        with open(disk, "r+b") as f:  # the disk was grown
            f.truncate(12 << 20)
            f.seek(10 << 20)
            f.write(b"x" * 65536)
        r = await agent.replicate_once()
        assert r.kind == "full"
        await restores_exactly(procserver, tmp_path, vault_at[1], r, {"sda": disk})
    finally:
        agent.close()


async def test_a_damaged_point_is_never_offered_as_a_basis(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path]) -> None:
    disk = tmp_path / "d.img"
    make_disk(disk, 4 << 20, seed=13)
    cfg = agent_config(tmp_path, pki, "bad01", procserver.port, {"sda": disk})
    agent = make_agent(cfg)
    try:
        await first_point(agent, procserver)
        packs = sorted(p for p in (tmp_path / "vault").rglob("*") if p.is_file()
                       and "packs" in p.parts)
        assert packs
        for p in packs:  # flip a byte in the middle of every pack
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0xFF
            p.write_bytes(bytes(data))
        shutil.rmtree(cfg.state_dir)
        r = await agent.replicate_once()
        # The read-back failed its checks: no basis, the whole disk is sent again.
        assert r.kind == "full" and r.bytes_sent >= (4 << 20) * 0.9
        assert await metric(procserver, "siterecovery_procserver_resync_bases_total") == 0
    finally:
        agent.close()
