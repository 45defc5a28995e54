"""End to end on loopback: agent -> mutual TLS -> process server -> vault -> restore."""

from __future__ import annotations

import asyncio
from pathlib import Path

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

SIZE = 96 << 20


async def test_every_point_restores_exactly(tmp_path: Path, pki: Pki, procserver: ProcServer,
                                            vault_at: tuple[str, Path]) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, SIZE, seed=7)
    agent = make_agent(agent_config(tmp_path, pki, "web01", procserver.port, {"sda": disk}))
    expected: dict[str, str] = {}
    try:
        for i in range(4):
            if i:
                mutate(disk, 0.03, seed=i)
            r = await agent.replicate_once()
            assert r.full == (i == 0)
            assert r.consistency == "crash"
            expected[r.cycle] = sha256(disk)
            if i:
                # A delta cycle sends only what changed, never the whole disk again.
                assert r.bytes_sent <= 0.04 * SIZE
    finally:
        agent.close()
    for cycle in expected:
        await procserver.wait_point(cycle)
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    points = await vault.list_points("web01")
    assert [p.cycle for p in points] == list(expected)
    for p in points:
        assert (await restore_all(vault, p, tmp_path / "out")) == {"sda": expected[p.cycle]}
    await vault.close()


async def test_multi_disk_point_spans_all_disks(tmp_path: Path, pki: Pki,
                                                procserver: ProcServer,
                                                vault_at: tuple[str, Path]) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_disk(a, 8 << 20, seed=1)
    make_disk(b, (5 << 20) + 12345, seed=2)  # not a whole number of blocks
    agent = make_agent(agent_config(tmp_path, pki, "db01", procserver.port, {"sda": a, "sdb": b}))
    try:
        r1 = await agent.replicate_once()
        want1 = {"sda": sha256(a), "sdb": sha256(b)}
        mutate(b, 0.2, seed=3, zero_share=0.5)
        with open(b, "r+b") as f:  # touch the short last block too
            f.seek((5 << 20) + 12000)
            f.write(b"tail")
        r2 = await agent.replicate_once()
        want2 = {"sda": sha256(a), "sdb": sha256(b)}
    finally:
        agent.close()
    p1, p2 = await procserver.wait_point(r1.cycle), await procserver.wait_point(r2.cycle)
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    assert await restore_all(vault, await vault.read_point(p1), tmp_path / "o") == want1
    assert await restore_all(vault, await vault.read_point(p2), tmp_path / "o") == want2
    await vault.close()


async def test_two_process_servers_write_one_vault(tmp_path: Path, pki: Pki,
                                                   vault_at: tuple[str, Path]) -> None:
    from tests.helpers import proc_config, running_procserver

    url, key = vault_at
    disks = {m: tmp_path / f"{m}.img" for m in ("web01", "db01")}
    for d in disks.values():
        make_disk(d, 16 << 20, seed=4)  # identical content: both servers store the same blocks
    async with running_procserver(proc_config(tmp_path / "a", pki, url, key)) as ps_a, \
            running_procserver(proc_config(tmp_path / "b", pki, url, key)) as ps_b:

        async def protect(machine: str, ps: ProcServer) -> dict[str, str]:
            agent = make_agent(agent_config(tmp_path, pki, machine, ps.port,
                                            {"sda": disks[machine]}))
            want = {}
            try:
                for i in range(3):
                    if i:
                        mutate(disks[machine], 0.05, seed=i + len(machine))
                    r = await agent.replicate_once()
                    want[await ps.wait_point(r.cycle)] = sha256(disks[machine])
            finally:
                agent.close()
            return want

        results = await asyncio.gather(protect("web01", ps_a), protect("db01", ps_b))
    vault = await open_vault(tmp_path / "vault", key)
    expected = {**results[0], **results[1]}
    points = await vault.list_points()
    assert {p.id for p in points} == set(expected)
    for p in points:
        assert await restore_all(vault, p, tmp_path / "out") == {"sda": expected[p.id]}
    await vault.close()


async def test_end_to_end_on_azure_blob(tmp_path: Path, pki: Pki, azurite_conn: str) -> None:
    """The production backend: the vault lives in Azure Blob Storage (Azurite here)."""
    from tests.helpers import proc_config, running_procserver
    from vault.keyslots import KeyMaterial, new_keyfile
    from vault.repo import Vault
    from vault.store.open import open_store

    conn = tmp_path / "azure.conn"
    conn.write_text(azurite_conn)
    url = f"azure://vault-e2e/site1?connection_string_file={conn}"
    key = tmp_path / "vault.key"
    await (await Vault.create(open_store(url), KeyMaterial(keyfile=new_keyfile(key)))).close()
    disk = tmp_path / "disk.img"
    make_disk(disk, 24 << 20, seed=12)
    expected = {}
    async with running_procserver(proc_config(tmp_path, pki, url, key)) as ps:
        agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
        try:
            for i in range(3):
                if i:
                    mutate(disk, 0.05, seed=30 + i)
                r = await agent.replicate_once()
                expected[await ps.wait_point(r.cycle)] = sha256(disk)
        finally:
            agent.close()
    # Restore from the blob store and the key alone, through the real CLI.
    from tests.helpers import run_cli

    for point_id, want in expected.items():
        out = tmp_path / "out" / point_id[:8]
        res = await asyncio.to_thread(run_cli, "restore", "--vault", url, "--key-file", str(key),
                                      "--point", point_id, "--out", str(out))
        assert res.returncode == 0, res.stderr
        assert sha256(out / "sda.img") == want


async def test_the_largest_block_size_replicates(tmp_path: Path, pki: Pki,
                                                 procserver: ProcServer,
                                                 vault_at: tuple[str, Path]) -> None:
    """1 MiB blocks: each BLOCK frame is larger than the receive buffer's usual mark."""
    disk = tmp_path / "disk.img"
    make_disk(disk, 24 << 20, seed=13)
    agent = make_agent(agent_config(tmp_path, pki, "big01", procserver.port, {"sda": disk},
                                    block_size=1 << 20))
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    point = await vault.read_point(await procserver.wait_point(r.cycle))
    assert await restore_all(vault, point, tmp_path / "o") == {"sda": sha256(disk)}
    await vault.close()
