"""Fault runs. Each ends the same way: every listed recovery point restores byte for byte
and nothing the process server acknowledged was lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog.testing
from sqlalchemy import select

from mobility.agent import Agent
from procserver import db
from procserver.server import ProcServer
from tests.backends import _free_port, azurite
from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    make_disk,
    mutate,
    proc_config,
    restore_all,
    sha256,
)
from vault.errors import WrongKeyError
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile
from vault.repo import Vault
from vault.store.open import open_store


async def _uploaded(ps: ProcServer) -> int:
    async with ps.sessionmaker() as s:
        return len((await s.execute(select(db.Cycle).where(db.Cycle.point_id.is_not(None)))
                    ).scalars().all())


async def _points_restore_exactly(vault: Vault, ps: ProcServer, expected: dict[str, str],
                                  out: Path) -> None:
    for cycle in expected:
        await ps.wait_point(cycle)
    points = await vault.list_points("web01")
    assert [p.cycle for p in points] == list(expected)
    for p in points:
        assert await restore_all(vault, p, out) == {"sda": expected[p.cycle]}


async def _into_the_cache(ps: ProcServer, agent: Agent, disk: Path, cycles: int,
                          seed: int) -> dict[str, str]:
    """``cycles`` acknowledged cycles while the storage is down; cycle -> disk digest."""
    expected: dict[str, str] = {}
    for i in range(cycles):
        if i:
            mutate(disk, 0.05, seed=seed + i)
        r = await agent.replicate_once()  # acknowledged: durable in the cache
        assert r.kind == ("full" if i == 0 else "delta")
        expected[r.cycle] = sha256(disk)
    assert await _uploaded(ps) == 0  # nothing could reach the storage
    return expected


async def _drained(ps: ProcServer, url: str, key: Path, expected: dict[str, str],
                   out: Path) -> None:
    vault = await Vault.open(open_store(url), KeyMaterial(keyfile=read_keyfile(key)))
    try:
        await _points_restore_exactly(vault, ps, expected, out)
    finally:
        await vault.close()


async def test_blob_storage_down_for_a_while_then_back(tmp_path: Path, pki: Pki) -> None:
    """Azurite really stopped: the process server keeps acknowledging into its cache, retries
    the uploads with backoff, and drains the backlog once the storage is back."""
    port, blobs = _free_port(), tmp_path / "azurite"
    conn_file = tmp_path / "azure.conn"
    key = tmp_path / "vault.key"
    url = f"azure://outage/site1?connection_string_file={conn_file}"
    disk = tmp_path / "disk.img"
    make_disk(disk, 16 << 20, seed=41)
    with azurite(blobs, port) as conn:
        conn_file.write_text(conn)
        await (await Vault.create(open_store(url), KeyMaterial(keyfile=new_keyfile(key)))
               ).close()
        ps = ProcServer(proc_config(tmp_path, pki, url, key))
        await ps.start()
    # Storage is down from here on until the second 'with azurite'.
    agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
    try:
        expected = await _into_the_cache(ps, agent, disk, 3, seed=50)
        with azurite(blobs, port):
            await _drained(ps, url, key, expected, tmp_path / "out")
    finally:
        agent.close()
        await ps.stop()


async def test_process_server_starts_while_blob_storage_is_down(tmp_path: Path,
                                                                 pki: Pki) -> None:
    """Storage unreachable when the process server starts: it starts anyway, acknowledges
    agents into its cache, opens the vault once the storage answers and drains."""
    port, blobs = _free_port(), tmp_path / "azurite"
    conn_file = tmp_path / "azure.conn"
    key = tmp_path / "vault.key"
    url = f"azure://outage/site2?connection_string_file={conn_file}"
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 << 20, seed=43)
    with azurite(blobs, port) as conn:
        conn_file.write_text(conn)
        await (await Vault.create(open_store(url), KeyMaterial(keyfile=new_keyfile(key)))
               ).close()
    # Storage is down from here on until the second 'with azurite'.
    ps = ProcServer(proc_config(tmp_path, pki, url, key))
    with structlog.testing.capture_logs() as logs:
        await ps.start()
    assert [e["event"] for e in logs if e["event"] == "vault_unavailable"] == \
        ["vault_unavailable"]
    assert not ps.vault_ready.is_set()
    agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
    try:
        expected = await _into_the_cache(ps, agent, disk, 2, seed=60)
        with azurite(blobs, port):
            await ps.vault_ready.wait()
            await _drained(ps, url, key, expected, tmp_path / "out")
    finally:
        agent.close()
        await ps.stop()


async def test_a_wrong_key_still_refuses_to_start(tmp_path: Path, pki: Pki) -> None:
    """Only an unreachable storage is waited out: a vault the key does not open is not."""
    port, blobs = _free_port(), tmp_path / "azurite"
    conn_file = tmp_path / "azure.conn"
    url = f"azure://outage/site3?connection_string_file={conn_file}"
    with azurite(blobs, port) as conn:
        conn_file.write_text(conn)
        await (await Vault.create(open_store(url), KeyMaterial(
            keyfile=new_keyfile(tmp_path / "right.key")))).close()
        new_keyfile(tmp_path / "wrong.key")
        ps = ProcServer(proc_config(tmp_path, pki, url, tmp_path / "wrong.key"))
        with pytest.raises(WrongKeyError):
            await ps.start()
    assert not (tmp_path / "procserver" / "procserver.db").exists()  # nothing left behind
