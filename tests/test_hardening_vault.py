"""Issue #12, the vault-side items: a key file that is not text (2), a missing index
object named as such by restore (5), one damaged manifest does not hide the others from
``points list`` / ``machines list`` (6), two swapped packs caught by the structural
``check`` (8), and ``check`` under a shared lock, so a concurrent prune (or writer)
cannot make it report what was rightly collected (13)."""

from __future__ import annotations

import asyncio
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.helpers import make_vault, open_vault, run_cli, write_full_point
from tests.test_golden import P1, P2, Golden, _flip, copy_golden
from tests.test_prune import _history
from vault import names
from vault.check import check_vault
from vault.errors import PermanentStoreError, UnindexedBlocksError, WrongKeyError
from vault.fpmap import point_fingerprints
from vault.keyslots import MAX_KEYFILE, KeyMaterial, read_keyfile
from vault.locks import LockInfo, list_locks, locked, try_acquire
from vault.prune import prune
from vault.retention import Retention
from vault.store.azure import AzureBlobStore
from vault.store.local import LocalStore
from vault.store.wrapper import StoreWrapper

BS = 64 * 1024


def _random_file(path: Path, size: int = 64) -> Path:
    # Bytes 0x80-0xff only: never valid UTF-8 on their own.
    path.write_bytes(bytes(random.Random(7).randrange(0x80, 0x100) for _ in range(size)))
    return path


# -- 2. key and passphrase files that are not text ----------------------------------------

@pytest.mark.parametrize("make", ["random", "directory", "huge", "empty"])
def test_read_keyfile_refuses_what_is_not_a_key_file(tmp_path: Path, make: str) -> None:
    path = tmp_path / "vault.key"
    if make == "random":
        _random_file(path)
    elif make == "directory":
        path.mkdir()
    elif make == "huge":
        path.write_bytes(b"a" * (MAX_KEYFILE + 1))
    else:
        path.write_bytes(b"")
    with pytest.raises(WrongKeyError, match=str(path)):
        read_keyfile(path)


async def test_random_bytes_as_key_file_exit_4_naming_the_file(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    bad = _random_file(tmp_path / "random.key")
    for verb in (["restore", "--out", str(tmp_path / "out")], ["points", "list"],
                 ["machines", "list"], ["check"]):
        r = run_cli(*verb, "--vault", g.url, "--key-file", str(bad))
        assert r.returncode == 4, (verb, r.stderr)
        assert "Traceback" not in r.stderr and "UnicodeDecodeError" not in r.stderr
        assert r.stderr.startswith("error: ") and str(bad) in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_enroll_passphrase_file_that_is_not_text_is_a_usage_error(tmp_path: Path) -> None:
    bad = _random_file(tmp_path / "passphrase")
    r = run_cli("mobility", "enroll", "--machine", "web01", "--site", "https://127.0.0.1:9",
                "--passphrase-file", str(bad), "--ca-file", str(tmp_path / "ca.pem"),
                "--disk", "sda=/dev/null", "--out", str(tmp_path / "agent"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and str(bad) in r.stderr and "UTF-8" in r.stderr


def test_vault_passphrase_file_that_is_not_text_is_a_usage_error(tmp_path: Path) -> None:
    bad = _random_file(tmp_path / "passphrase")
    r = run_cli("points", "list", "--vault", f"file://{tmp_path / 'v'}",
                "--passphrase-file", str(bad))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and str(bad) in r.stderr


def test_registration_key_file_that_is_not_text_is_a_usage_error(tmp_path: Path) -> None:
    bad = _random_file(tmp_path / "registration.key")
    r = run_cli("register", "--key-file", str(bad), "--api", "http://127.0.0.1:9",
                "--token-file", str(tmp_path / "token"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and str(bad) in r.stderr and "not text" in r.stderr


def test_passphrase_file_is_read_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (64 << 10))
    r = run_cli("points", "list", "--vault", f"file://{tmp_path / 'v'}",
                "--passphrase-file", str(big))
    assert r.returncode == 2 and str(big) in r.stderr and "larger than" in r.stderr, r.stderr


def test_azure_credentials_file_that_is_not_text_names_it(tmp_path: Path) -> None:
    bad = _random_file(tmp_path / "account.key")
    with pytest.raises(PermanentStoreError, match="not UTF-8"):
        AzureBlobStore.from_url(f"azure://c/p?connection_string_file={bad}")


# -- 5. a missing index object: restore says so, as check does ------------------------------

async def test_restore_with_a_missing_index_object_blames_the_index(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    g.path(g.index_of[g.full_pack]).unlink()
    r = run_cli("restore", "--vault", g.url, "--key-file", str(g.key), "--point", P1,
                "--out", str(tmp_path / "out"))
    assert r.returncode == 3, r.stderr
    assert "in no index" in r.stderr and "rebuild-index" in r.stderr, r.stderr
    assert "tampered" not in r.stderr and "failed verification" not in r.stderr, r.stderr
    assert f"points/{P1}" in r.stderr  # which point could not be restored
    assert os.listdir(tmp_path / "out") == []
    r = run_cli("check", "--vault", g.url, "--key-file", str(g.key))
    assert r.returncode == 3 and "in no index" in r.stdout and "rebuild-index" in r.stdout
    # Reading a point's fingerprints back (a resync) says the same.
    v = await open_vault(g.vault, g.key)
    try:
        with pytest.raises(UnindexedBlocksError, match="rebuild-index"):
            await point_fingerprints(v, await v.read_point(P1), "sda",
                                     index=await v.load_index())
    finally:
        await v.close()
    # And the advice is right: after rebuild-index the point restores.
    assert run_cli("rebuild-index", "--vault", g.url, "--key-file", str(g.key)).returncode == 0
    r = run_cli("restore", "--vault", g.url, "--key-file", str(g.key), "--point", P1,
                "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr


# -- 6. one damaged manifest does not stop the listings ------------------------------------

def _list(g: Golden, *verb: str, json_out: bool = False) -> tuple[int, str, str]:
    r = run_cli(*verb, "--vault", g.url, "--key-file", str(g.key),
                *(["--json"] if json_out else []))
    return r.returncode, r.stdout, r.stderr


async def test_points_list_shows_every_intact_point_and_names_the_damaged(tmp_path: Path
                                                                          ) -> None:
    g = await copy_golden(tmp_path)
    _flip(g.path(names.POINTS + P1), os.path.getsize(g.path(names.POINTS + P1)) // 2)
    code, out, err = _list(g, "points", "list")
    assert code == 3, err
    assert P2[:16] in out and "DAMAGED" in out and f"points/{P1}" in out
    assert f"error: points/{P1}: damaged:" in err and "Traceback" not in err
    code, out, err = _list(g, "points", "list", json_out=True)
    assert code == 3, err
    rows = json.loads(out)
    assert [(r["id"], r["damaged"] is None) for r in rows] == [(P2, True), (P1, False)]
    assert rows[0]["machine"] == "golden-vm" and rows[0]["object"] == f"points/{P2}"
    assert rows[1]["object"] == f"points/{P1}" and rows[1]["machine"] is None
    # --machine keeps the damaged one: whose it is cannot be told.
    code, out, _err = _list(g, "points", "list", "--machine", "golden-vm", json_out=True)
    assert code == 3 and [r["id"] for r in json.loads(out)] == [P2, P1]


async def test_machines_list_shows_every_machine_and_names_the_damaged(tmp_path: Path
                                                                       ) -> None:
    g = await copy_golden(tmp_path)
    _flip(g.path(names.POINTS + P2), 30)
    code, out, err = _list(g, "machines", "list")
    assert code == 3, err
    assert "golden-vm" in out and f"points/{P2}" in out
    assert f"error: points/{P2}: damaged:" in err
    code, out, err = _list(g, "machines", "list", json_out=True)
    assert code == 3, err
    machine, damaged = json.loads(out)
    assert (machine["machine"], machine["points"], machine["latest_point"]) == \
        ("golden-vm", 1, P1)
    assert damaged["machine"] is None
    assert [d["object"] for d in damaged["damaged_points"]] == [f"points/{P2}"]


async def test_restore_by_id_sets_aside_a_damaged_manifest_but_latest_does_not(
        tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    _flip(g.path(names.POINTS + P2), 30)
    r = run_cli("restore", "--vault", g.url, "--key-file", str(g.key), "--point", P1[:12],
                "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    r = run_cli("restore", "--vault", g.url, "--key-file", str(g.key),
                "--out", str(tmp_path / "latest"))
    assert r.returncode == 3 and f"points/{P2}" in r.stderr  # 'latest' might be the damaged one


# -- 8. two swapped packs: caught without reading the data ----------------------------------

async def _two_packs(tmp: Path) -> tuple[Path, Path, list[str]]:
    """A vault with two points of one 4-block disk each, in two packs of about one size."""
    _url, key = await make_vault(tmp)
    v = await open_vault(tmp / "vault", key)
    rng = random.Random(3)
    try:
        for machine in ("m1", "m2"):
            await write_full_point(v, rng.randbytes(4 * BS), machine=machine)
    finally:
        await v.close()
    packs = sorted(str(p.relative_to(tmp / "vault")) for p in (tmp / "vault").rglob("packs/*/*"))
    return tmp / "vault", key, packs


async def test_structural_check_catches_two_swapped_packs(tmp_path: Path) -> None:
    vault, key, packs = await _two_packs(tmp_path)
    a, b = (vault / p for p in packs)
    # Same blocks region (incompressible blocks of one size); only the trailers differ by
    # a few bytes: no pack is too short for what the index gives, nothing gives it away.
    assert len(packs) == 2 and abs(a.stat().st_size - b.stat().st_size) < 64
    km = KeyMaterial(keyfile=read_keyfile(key))
    assert (await check_vault(LocalStore(vault), km)).problems == []
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)

    class Counting(StoreWrapper):
        read = 0

        async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
            data = await super().get(name, offset, length)
            if name.startswith(names.PACKS):
                self.read += len(data)
            return data

    store = Counting(LocalStore(vault))
    report = await check_vault(store, km)
    assert {(p.object, p.kind) for p in report.errors} == {(packs[0], "damaged"),
                                                           (packs[1], "damaged")}
    assert "another pack's content" in report.errors[0].reason
    assert store.read < a.stat().st_size  # the trailers only, not the blocks
    assert report.counts["trailers_read"] == 2
    r = run_cli("check", "--vault", f"file://{vault}", "--key-file", str(key))
    assert r.returncode == 3, r.stdout + r.stderr
    assert all(f"ERROR: {p}: damaged: " in r.stdout for p in packs), r.stdout
    # --read-data finds the same, and which points the swap breaks.
    report = await check_vault(LocalStore(vault), km, read_data=True)
    assert {p.object for p in report.errors} >= {*packs}
    assert sum(p.kind == "unrestorable" for p in report.errors) == 2


# -- 13. check holds a shared lock: a prune cannot pull objects from under it ---------------

class Gate(StoreWrapper):
    """Holds the first read of an object under ``prefix`` until ``go`` is set; ``held``
    is set when one is held."""

    def __init__(self, inner: LocalStore, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.held, self.go = asyncio.Event(), asyncio.Event()

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith(self.prefix) and not self.held.is_set():
            self.held.set()
            await self.go.wait()
        return await super().get(name, offset, length)


async def test_check_concurrent_with_prune_reports_nothing_missing(tmp_path: Path) -> None:
    vault, key, _expected = await _history(tmp_path / "h", now=datetime.now(UTC))
    km = KeyMaterial(keyfile=read_keyfile(key))
    gate = Gate(LocalStore(vault), names.MAPS)  # check holds mid-way: index read, maps next
    checking = asyncio.create_task(check_vault(gate, km))
    await gate.held.wait()
    v = await open_vault(vault, key)
    try:
        # The check holds a shared lock: a prune cannot start now.
        locks, _bad = await list_locks(v)
        assert [(lk.kind, lk.purpose) for lk in locks] == [("shared", "check")]
        got = await try_acquire(v, "exclusive", "prune")
        assert isinstance(got, LockInfo) and got.purpose == "check"

        async def pruning() -> int:
            async with locked(v, "exclusive", "prune", wait=120):
                with ThreadPoolExecutor(2) as ex:
                    return len((await prune(v, Retention(), ex)).forgotten)

        pruned = asyncio.create_task(pruning())
        gate.go.set()
        report = await checking
        assert report.problems == [], report.problems
        assert await pruned > 0  # the prune ran, after the check, and collected
        assert (await check_vault(LocalStore(vault), km)).problems == []
        assert await list_locks(v) == ([], [])
    finally:
        await v.close()


async def test_check_with_read_only_access_runs_unlocked_with_a_warning(tmp_path: Path
                                                                        ) -> None:
    class ReadOnly(StoreWrapper):
        async def put(self, name: str, data: bytes | bytearray) -> None:
            raise PermanentStoreError(f"{name}: 403 AuthorizationPermissionMismatch")

    g = await copy_golden(tmp_path)
    report = await check_vault(ReadOnly(LocalStore(g.vault)),
                               KeyMaterial(keyfile=read_keyfile(g.key)), read_data=True)
    assert report.errors == [] and report.counts["digests_verified"] == 2
    assert [(p.object, p.kind) for p in report.warnings] == [("locks/", "unlocked")]
    assert "403" in report.warnings[0].reason


async def test_check_concurrent_with_a_writer_reports_nothing(tmp_path: Path) -> None:
    _url, key = await make_vault(tmp_path)
    km = KeyMaterial(keyfile=read_keyfile(key))
    rng = random.Random(9)
    v = await open_vault(tmp_path / "vault", key)
    try:
        await write_full_point(v, rng.randbytes(3 * BS), machine="m1")
        gate = Gate(LocalStore(tmp_path / "vault"), names.INDEX)
        checking = asyncio.create_task(check_vault(gate, km))
        await gate.held.wait()
        # A process server writes (under its own shared lock) while the check runs.
        async with locked(v, "shared", "upload"):
            await write_full_point(v, rng.randbytes(3 * BS), machine="m2")
        gate.go.set()
        report = await checking
        assert report.problems == [], report.problems
    finally:
        await v.close()
    assert len((await check_vault(LocalStore(tmp_path / "vault"), km)).problems) == 0

