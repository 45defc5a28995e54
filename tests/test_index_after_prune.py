"""The process server's on-disk block index after a prune (#16): a prune that runs while
the process server is up deletes blocks its local table still lists; the next upload
must not deduplicate against them. The uploader refreshes the index under its shared
lock (``VaultAccess.refresh_index``): an index object gone means a rewritten index, so
the table is rebuilt from the vault's index objects. A machine then replicating data
that only the pruned point held stores it anew, and every point restores byte-exact.

The process server starts on an empty vault, so its index starts in memory; it moves to
disk once it outgrows ``index_memory_bytes`` (0 here) at a refresh."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.helpers import (
    BLOCK,
    Pki,
    agent_config,
    make_agent,
    open_vault,
    proc_config,
    restore_all,
    running_procserver,
    sha256,
)
from vault.check import check_vault
from vault.indexdb import DiskIndex
from vault.keyslots import KeyMaterial, read_keyfile
from vault.locks import locked
from vault.prune import prune
from vault.retention import Retention
from vault.store.local import LocalStore

SIZE = 4 << 20


async def test_a_prune_while_it_runs_never_leaves_it_deduplicating_against_deleted_blocks(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    cfg = proc_config(tmp_path, pki, *vault_at, index_memory_bytes=0)  # always on disk
    disk, other = tmp_path / "web01.img", tmp_path / "db01.img"
    first = os.urandom(SIZE)
    disk.write_bytes(first)
    expected: dict[str, str] = {}
    async with running_procserver(cfg) as ps:
        web = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
        db = make_agent(agent_config(tmp_path, pki, "db01", ps.port, {"sda": other}))
        vault = await open_vault(tmp_path / "vault", vault_at[1])
        try:
            r = await web.replicate_once()
            old = await ps.wait_point(r.cycle)
            disk.write_bytes(os.urandom(SIZE))  # every block overwritten: only `old` has them
            r = await web.replicate_once()
            expected[await ps.wait_point(r.cycle)] = sha256(disk)
            table = ps.vaults.index
            assert isinstance(table, DiskIndex)
            firsts = [vault.keyring.block_id(first[n:n + BLOCK]) for n in range(0, SIZE, BLOCK)]
            assert all(b in table for b in firsts)

            # The prune, while the process server runs: `old` forgotten, its packs deleted.
            async with locked(vault, "exclusive", "prune", wait=30):
                with ThreadPoolExecutor(2) as ex:
                    report = await prune(vault, Retention(0, 0, 0, 0), ex,
                                         now=datetime.now(UTC) + timedelta(seconds=1))
            assert report.forgotten == [old] and report.packs_deleted
            assert all(b in table for b in firsts)  # the table is stale until refreshed

            # Another machine replicates exactly what only the pruned point held.
            other.write_bytes(first)
            r = await db.replicate_once()
            expected[await ps.wait_point(r.cycle)] = sha256(other)
            points = await vault.list_points()
            assert {p.id for p in points} == set(expected)
            for p in points:
                assert await restore_all(vault, p, tmp_path / "out") == {"sda": expected[p.id]}
            rebuilt = ps.vaults.index
            assert isinstance(rebuilt, DiskIndex) and rebuilt is not table
            index = await vault.load_index()
            assert all(b in index and b in rebuilt for b in firsts)  # stored anew
            assert set(rebuilt.packs) == set(index.packs)
        finally:
            await vault.close()
            web.close()
            db.close()
    report2 = await check_vault(LocalStore(tmp_path / "vault"),
                                KeyMaterial(keyfile=read_keyfile(vault_at[1])), read_data=True)
    assert report2.errors == [], report2.errors
