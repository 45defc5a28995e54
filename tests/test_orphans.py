"""Orphan packs: the process server adopts or removes the packs it left outside the index
(a kill -9, a failed upload) and never touches anyone else's (#12 item 12)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import zstandard

from procserver.orphans import settle
from procserver.packlog import PackLog
from procserver.vaultaccess import VaultAccess
from tests.helpers import (
    Daemon,
    Pki,
    agent_config,
    make_agent,
    make_disk,
    open_vault,
    run_cli,
    sha256,
    write_toml,
)
from vault import names
from vault.check import check_vault
from vault.keyslots import KeyMaterial, read_keyfile
from vault.pack import build_pack
from vault.rebuild import read_trailer
from vault.repo import Vault
from vault.store.local import LocalStore


def _blocks(n: int) -> list[bytes]:
    return [secrets.token_bytes(4096) for _ in range(n)]


async def _put_pack(vault: Vault, blocks: list[bytes], log: PackLog | None = None,
                    seq: int = 0, *, indexed: bool = False) -> str:
    """A real pack of ``blocks``, put as the uploader puts one (recorded first), and
    listed by an index object of its own if ``indexed``."""
    pack_id = names.random_id()
    data, entries = build_pack(vault.keyring, pack_id,
                               [(vault.keyring.block_id(b), b) for b in blocks],
                               zstandard.ZstdCompressor())
    if log is not None:
        log.record(pack_id, seq)
    await vault.put_pack(pack_id, data)
    if indexed:
        await vault.put_index({pack_id: entries})
    return pack_id


async def _packs(vault: Vault) -> set[str]:
    return {names.pack_id_of(i.name) async for i in vault.store.list(names.PACKS)}


async def _unindexed(vault_dir: Path, key: Path) -> set[str]:
    report = await check_vault(LocalStore(vault_dir), KeyMaterial(keyfile=read_keyfile(key)))
    assert not report.errors, report.errors
    return {names.pack_id_of(p.object) for p in report.problems if p.kind == "unindexed"}


async def test_settle_adopts_what_a_resuming_cycle_needs_and_removes_the_rest(
        tmp_path: Path, vault_at: tuple[str, Path]) -> None:
    _url, key = vault_at
    log = PackLog(tmp_path / "pack-log")
    vault = await open_vault(tmp_path / "vault", key)
    try:
        resuming, finished = 1, 2
        needed = _blocks(3)
        adopted = await _put_pack(vault, needed, log, resuming)
        of_finished = await _put_pack(vault, _blocks(2), log, finished)
        # Its blocks were stored again by a retry whose index got written: not needed.
        stored = _blocks(2)
        redundant = await _put_pack(vault, stored, log, resuming)
        retried = await _put_pack(vault, stored, indexed=True)
        # Logged, and indexed after all (the kill came after its index object).
        listed = await _put_pack(vault, _blocks(1), log, resuming, indexed=True)
        # Damaged: its trailer no longer authenticates.
        damaged = await _put_pack(vault, _blocks(2), log, resuming)
        path = tmp_path / "vault" / names.pack_name(damaged)
        raw = bytearray(path.read_bytes())
        raw[-20] ^= 0xFF
        path.write_bytes(bytes(raw))
        never_put = names.random_id()
        log.record(never_put, resuming)  # killed before the put
        # Another process server's orphan: not in our log, never touched.
        theirs = await _put_pack(vault, _blocks(2))
        assert await _unindexed(tmp_path / "vault", key) == {
            adopted, of_finished, redundant, damaged, theirs}

        done = await settle(vault, await vault.load_index(), log, resumable={resuming})
        assert done.adopted == [adopted]
        assert sorted(done.removed) == sorted([of_finished, redundant, damaged])
        assert done.damaged == [damaged]
        assert log.read() == {}  # every entry settled
        assert await _packs(vault) == {adopted, retried, listed, theirs}
        assert await _unindexed(tmp_path / "vault", key) == {theirs}
        index = await vault.load_index()
        for b in needed:  # adopted: its blocks are found where the orphan put them
            assert await vault.read_block(vault.keyring.block_id(b), index) == b
    finally:
        await vault.close()


async def test_a_cycle_once_uploaded_removes_only_its_own_unindexed_packs(
        tmp_path: Path, vault_at: tuple[str, Path]) -> None:
    """Packs of failed attempts go when their cycle's point is written; the packs another
    cycle is writing right now (not indexed yet) stay."""
    _url, key = vault_at
    log = PackLog(tmp_path / "pack-log")
    access = VaultAccess(LocalStore(tmp_path / "vault"),
                         KeyMaterial(keyfile=read_keyfile(key)), pack_log=log)
    await access.open()
    try:
        await _put_pack(access.vault, _blocks(2), log, 7)  # a failed attempt's
        in_flight = await _put_pack(access.vault, _blocks(2), log, 8)
        await access.settle_cycle(7)
        assert await _packs(access.vault) == {in_flight}
        assert log.read() == {in_flight: 8}
    finally:
        await access.close()


async def test_a_pack_an_index_lists_stays_when_its_blocks_are_found_elsewhere(
        tmp_path: Path, vault_at: tuple[str, Path]) -> None:
    """Two process servers stored the same blocks: the index locates them in the other
    server's pack, but ours is listed by our index object, and deleting it would leave
    that object pointing at nothing (a restore reading through it would fail)."""
    _url, key = vault_at
    log = PackLog(tmp_path / "pack-log")
    access = VaultAccess(LocalStore(tmp_path / "vault"),
                         KeyMaterial(keyfile=read_keyfile(key)), pack_log=log)
    await access.open()
    try:
        same = _blocks(3)
        ours = await _put_pack(access.vault, same, log, 7, indexed=True)
        theirs = await _put_pack(access.vault, same, indexed=True)
        vault = access.vault
        index = await vault.load_index()
        size = (await vault.store.stat(names.pack_name(theirs))).size
        index.add_pack(theirs, (await read_trailer(vault, theirs, size))[0])
        assert {loc.pack_id for loc in index.entries.values()} == {theirs}
        done = await settle(vault, index, log, set(), only={7})
        assert done.removed == [] and done.adopted == []
        assert await _packs(access.vault) == {ours, theirs}
        assert log.read() == {}
    finally:
        await access.close()


async def test_a_vault_opened_in_the_background_is_settled_before_it_is_ready(
        tmp_path: Path, vault_at: tuple[str, Path]) -> None:
    """A process server whose storage did not answer at start opens its vault later:
    the orphans are settled before ``ready`` lets the uploader go on."""
    _url, key = vault_at
    log = PackLog(tmp_path / "pack-log")
    vault = await open_vault(tmp_path / "vault", key)
    try:
        gone = await _put_pack(vault, _blocks(2), log, 3)  # cycle 3 will not resume
    finally:
        await vault.close()
    access = VaultAccess(LocalStore(tmp_path / "vault"),
                         KeyMaterial(keyfile=read_keyfile(key)), pack_log=log)
    seen: list[set[str]] = []

    async def settle_first() -> None:
        await access.settle_orphans(set())
        seen.append(await _packs(access.vault))

    access.before_ready = settle_first
    await access.open_later()
    try:
        assert access.ready.is_set() and seen == [set()]
        assert gone not in await _packs(access.vault) and log.read() == {}
    finally:
        await access.close()


async def test_a_pack_log_that_cannot_be_written_does_not_stop_uploads(
        tmp_path: Path, vault_at: tuple[str, Path]) -> None:
    _url, key = vault_at
    log = PackLog(tmp_path / "missing-dir" / "pack-log")  # every append fails (ENOENT)
    access = VaultAccess(LocalStore(tmp_path / "vault"),
                         KeyMaterial(keyfile=read_keyfile(key)), pack_log=log)
    record = access.pack_recorder(1)
    assert record is not None
    await record(names.random_id())  # logged as pack_log_unwritable, not raised
    assert log.read() == {}


async def test_the_pack_log_keeps_whole_entries_only(tmp_path: Path) -> None:
    log = PackLog(tmp_path / "pack-log")
    a, b = names.random_id(), names.random_id()
    log.record(a, 1)
    log.record(b, 2)
    with open(log.path, "ab") as f:
        f.write(names.random_id()[:40].encode())  # a torn append: its pack was never put
    assert log.read() == {a: 1, b: 2}
    log.forget({a})
    assert log.read() == {b: 2}


def _proc_toml(tmp: Path, pki: Pki, url: str, key: Path) -> Path:
    cert, pkey = pki.server()
    return write_toml(tmp / "procserver.toml", {
        "data_dir": str(tmp / "procserver"), "vault_url": url, "vault_key_file": str(key),
        "tls_cert": cert, "tls_key": pkey, "tls_ca": pki.ca_path, "listen_port": 0,
        "metrics_port": 0})


async def test_kill9_mid_upload_then_restart_leaves_no_orphan_and_every_point_restores(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    vault_dir = tmp_path / "vault"
    disk = tmp_path / "disk.img"
    make_disk(disk, 24 << 20, seed=81)
    want = sha256(disk)
    # Index objects never reach the vault: every pack the upload puts stays an orphan.
    failing = _proc_toml(tmp_path, pki, f"fault+{url}?fail=index/", key)
    ps = Daemon(["procserver", "run", "--config", str(failing)], "procserver_started")
    ready = await ps.start()
    agent = make_agent(agent_config(tmp_path, pki, "orph01", int(str(ready["port"])),
                                    {"sda": disk}))
    try:
        r = await agent.replicate_once()  # acknowledged: fsynced in the cache
    finally:
        agent.close()
    # The checkpoint's packs are all put before its index object is tried (and failed
    # after its retries); the kill comes while the next attempt runs.
    await ps.wait_events("cycle_upload_failed", 1)
    await ps.kill9()
    vault_dir = tmp_path / "vault"

    def packs() -> set[str]:
        return {p.name for p in (vault_dir / "packs").rglob("*") if p.is_file()
                and not p.name.startswith(".")}

    left = packs()
    assert left and await _unindexed(vault_dir, key) == left  # what check warned about

    ps = Daemon(["procserver", "run", "--config", str(_proc_toml(tmp_path, pki, url, key))],
                "procserver_started")
    await ps.start()
    try:
        (settled,) = ps.events("orphan_packs_settled")  # before it started
        n = 1
        while not any(e.get("cycle") == r.cycle for e in ps.events("point_uploaded")):
            await ps.wait_events("point_uploaded", n)
            n += 1
    finally:
        assert await ps.stop() == 0
    # The packs of the first attempt are adopted; a second attempt's copies of the same
    # blocks removed. Nothing was sent again: the adopted packs are the point's.
    adopted, removed = int(str(settled["adopted"])), int(str(settled["removed"]))
    assert adopted >= 1 and adopted + removed == len(left)
    assert packs() <= left and len(packs()) == adopted
    res = run_cli("check", "--vault", url, "--key-file", str(key), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["warnings"] == 0 and report["errors"] == 0, report["problems"]
    res = run_cli("restore", "--vault", url, "--key-file", str(key), "--point", "latest",
                  "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert sha256(tmp_path / "out" / "sda.img") == want
    log_path = tmp_path / "procserver" / "pack-log"
    assert os.path.exists(log_path) and PackLog(log_path).read() == {}


async def test_a_second_process_server_on_the_same_data_directory_is_refused(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """It would share the cache and the pack log, and settle the first one's packs in
    flight as orphans."""
    url, key = vault_at
    cfg = _proc_toml(tmp_path, pki, url, key)
    first = Daemon(["procserver", "run", "--config", str(cfg)], "procserver_started")
    await first.start()
    try:
        second = run_cli("procserver", "run", "--config", str(cfg))
        assert second.returncode == 1, second.stdout + second.stderr
        assert first.proc is not None
        assert f"another process server (pid {first.proc.pid}) uses the data directory" \
            in second.stderr
    finally:
        await first.stop()
    # The kernel dropped the lock with the first one: a restart goes ahead.
    again = Daemon(["procserver", "run", "--config", str(cfg)], "procserver_started")
    await again.start()
    await again.stop()
