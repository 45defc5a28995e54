"""Vault key management: key files and passphrases, slots added, removed and changed.

Key operations only re-wrap the master key: data objects stay byte-identical, the
master key is never stored unwrapped, and no passphrase is ever printed. The CLI
runs as a real subprocess; each passphrase wrap or unwrap is one scrypt run
(n = 2^15), so the tests keep their count small.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, make_disk, sha256, write_full_point
from vault import names
from vault.errors import WrongKeyError
from vault.keys import KeySlotError, add_slot, change_passphrase, list_slots, remove_slot
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile, wrap
from vault.repo import Vault
from vault.store.local import LocalStore

BS = 64 * 1024
PW = "correct horse battery staple"
PW2 = "tr0ub4dor&3 is not a passphrase"


class Cli:
    """Runs the real CLI and keeps every byte it printed, to look for secrets in it."""

    def __init__(self, vault: Path) -> None:
        self.url = f"file://{vault}"
        self.printed: list[str] = []

    def __call__(self, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "siterecovery", *args], capture_output=True,
                           text=True, cwd=REPO, timeout=300, env={**os.environ, **(env or {})})
        self.printed += [r.stdout, r.stderr]
        return r

    def ok(self, *args: str, env: dict[str, str] | None = None) -> Any:
        r = self(*args, "--json", env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def never_printed(self, *secrets: str) -> None:
        for text in self.printed:
            for s in secrets:
                assert s not in text


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


async def _write_point(vault: Path, km: KeyMaterial, tmp: Path) -> tuple[str, str]:
    """Write one point of a 1 MiB disk; returns (sha256 of the disk, opening slot id)."""
    disk = tmp / "disk.img"
    make_disk(disk, 1 << 20, seed=5)
    data = disk.read_bytes()
    v = await Vault.open(LocalStore(vault), km)
    await write_full_point(v, data)
    await v.close()
    assert v.slot is not None
    return sha256(disk), v.slot


def _data_objects(vault: Path) -> dict[str, bytes]:
    """Every object except the key slots: config, packs, index, maps, points."""
    out = {str(p.relative_to(vault)): p.read_bytes() for p in vault.rglob("*") if p.is_file()
           and not p.name.startswith(".")}
    assert any(k.startswith(names.PACKS) for k in out) and any(k.startswith(names.POINTS)
                                                                for k in out)
    return {k: v for k, v in out.items() if not k.startswith(names.KEYS)}


def _slots(vault: Path) -> dict[str, Any]:
    return {p.name: json.loads(p.read_bytes()) for p in (vault / "keys").iterdir()}


async def _assert_master_never_stored(vault: Path, km: KeyMaterial) -> None:
    v = await Vault.open(LocalStore(vault), km)
    master = v.keyring._master
    await v.close()
    forms = [master, base64.b64encode(master), master.hex().encode(),
             base64.urlsafe_b64encode(master)]
    files = [p for p in vault.rglob("*") if p.is_file()]
    assert any(p.parent.name == "keys" for p in files)
    for p in files:
        blob = p.read_bytes()
        assert not any(f in blob for f in forms), f"master key found in {p}"


async def test_cli_key_lifecycle(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    key, key2 = tmp_path / "vault.key", tmp_path / "second.key"
    pw = _secret_file(tmp_path / "pw", PW)
    cli = Cli(vault)
    loc = ["--vault", cli.url]

    # init with a key file and a passphrase: two slots, one master key
    out = cli.ok("vault", "init", *loc, "--key-file", str(key), "--passphrase-file", str(pw))
    assert out["key_file"] == str(key) and out["passphrase"] is True
    assert sorted(str(s["kind"]) for s in out["slots"]) == ["keyfile", "passphrase"]
    init_slots = _slots(vault)
    kinds = {str(d["kind"]): s for s, d in init_slots.items()}
    assert all("created" in d for d in init_slots.values())

    # the passphrase alone opens it (library: one scrypt run)
    want, opened = await _write_point(vault, KeyMaterial(passphrase=PW), tmp_path)
    assert opened == kinds["passphrase"]
    before = _data_objects(vault)

    listed = cli.ok("vault", "key", "list", *loc, "--key-file", str(key))
    rows = {str(r["slot"]): r for r in listed["slots"]}
    assert set(rows) == set(init_slots)
    assert rows[kinds["keyfile"]]["in_use"] is True
    assert rows[kinds["passphrase"]]["kdf"] == {"name": "scrypt", "n": 2**15, "r": 8, "p": 1}
    assert all(r["created"] for r in rows.values())

    # add a key-file slot, authenticated with the first key file; it opens the vault
    added = cli.ok("vault", "key", "add", *loc, "--key-file", str(key),
                   "--new-key-file", str(key2))
    new_slot = str(added["added"]["slot"])
    assert added["key_file"] == str(key2) and key2.stat().st_mode & 0o777 == 0o600
    assert cli.ok("points", "list", *loc, "--key-file", str(key2))
    r = cli("vault", "key", "add", *loc, "--key-file", str(key), "--new-key-file", str(key2))
    assert r.returncode == 1 and "already exists" in r.stderr

    # the slot this command opens with is not removed without --force
    r = cli("vault", "key", "remove", *loc, "--key-file", str(key), kinds["keyfile"])
    assert r.returncode == 1 and "--force" in r.stderr
    removed = cli.ok("vault", "key", "remove", *loc, "--key-file", str(key2),
                     kinds["keyfile"][:6])
    assert removed["removed"]["slot"] == kinds["keyfile"]
    r = cli("points", "list", *loc, "--key-file", str(key))
    assert r.returncode == 4 and "key file given opens none of the 2 key slot(s)" in r.stderr

    # the passphrase (from the environment this time) still restores, exactly
    r = cli("restore", *loc, "--passphrase-env", "SR_PW", "--out", str(tmp_path / "out"),
            env={"SR_PW": PW})
    assert r.returncode == 0, r.stderr
    assert sha256(tmp_path / "out" / "sda.img") == want

    # a wrong passphrase: exit 4, and the message says what was wrong
    bad = _secret_file(tmp_path / "bad", "not the passphrase")
    r = cli("points", "list", *loc, "--passphrase-file", str(bad))
    assert r.returncode == 4
    assert "error: the passphrase given opens none of the 2 key slot(s)" in r.stderr

    # passwd: new slot first, then the old one goes; the old passphrase stops working
    changed = cli.ok("vault", "key", "passwd", *loc, "--passphrase-file", str(pw),
                     "--new-passphrase-env", "SR_NEW", env={"SR_NEW": PW2})
    assert changed["removed"]["slot"] == kinds["passphrase"]
    assert set(_slots(vault)) == {new_slot, str(changed["added"]["slot"])}
    r = cli("machines", "list", *loc, "--passphrase-file", str(pw))
    assert r.returncode == 4

    # down to the last slot: it is never removed, not even with --force
    cli.ok("vault", "key", "remove", *loc, "--key-file", str(key2),
           str(changed["added"]["slot"]))
    r = cli("vault", "key", "remove", *loc, "--key-file", str(key2), "--force", new_slot)
    assert r.returncode == 1 and "last usable key slot" in r.stderr
    assert set(_slots(vault)) == {new_slot}

    # none of it touched the data, stored the master key or printed a passphrase
    assert _data_objects(vault) == before
    await _assert_master_never_stored(vault, KeyMaterial(keyfile=read_keyfile(key2)))
    cli.never_printed(PW, PW2)
    r = cli("restore", *loc, "--key-file", str(key2), "--out", str(tmp_path / "out2"))
    assert r.returncode == 0, r.stderr
    assert sha256(tmp_path / "out2" / "sda.img") == want


async def test_cli_init_with_passphrase_only(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    pw = _secret_file(tmp_path / "pw", PW)
    cli = Cli(vault)
    out = cli.ok("vault", "init", "--vault", cli.url, "--passphrase-env", "SR_PW",
                 env={"SR_PW": PW})
    assert out["key_file"] is None and out["passphrase"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name != "pw"] == ["vault"]  # no key file
    listed = cli.ok("vault", "key", "list", "--vault", cli.url, "--passphrase-file", str(pw))
    [row] = listed["slots"]
    assert row["kind"] == "passphrase" and row["in_use"] is True
    r = cli("vault", "key", "remove", "--vault", cli.url, "--passphrase-file", str(pw),
            "--force", row["slot"])
    assert r.returncode == 1 and "last usable key slot" in r.stderr
    r = cli("points", "list", "--vault", cli.url)
    assert r.returncode == 2 and "--passphrase-file" in r.stderr
    cli.never_printed(PW)


def test_cli_refuses_weak_or_missing_passphrases(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "vault")
    short = _secret_file(tmp_path / "short", "abc")
    r = cli("vault", "init", "--vault", cli.url, "--passphrase-file", str(short))
    assert r.returncode == 2 and "shorter than 8" in r.stderr
    r = cli("vault", "init", "--vault", cli.url, "--passphrase-env", "SR_UNSET_FOR_TEST")
    assert r.returncode == 2 and "SR_UNSET_FOR_TEST is not set" in r.stderr
    assert not (tmp_path / "vault").exists()
    cli.never_printed("abc\n")


async def test_slot_operations_rewrap_only(tmp_path: Path) -> None:
    """Library level: open with either key, add, remove, passwd; data untouched."""
    vault = tmp_path / "vault"
    key = tmp_path / "vault.key"
    km_file = KeyMaterial(keyfile=new_keyfile(key))
    v = await Vault.create(LocalStore(vault), [km_file, KeyMaterial(passphrase=PW)])
    master = v.keyring._master
    await v.close()
    want, opened = await _write_point(vault, km_file, tmp_path)
    before = _data_objects(vault)

    v = await Vault.open(LocalStore(vault), km_file)
    assert v.slot == opened and v.keyring._master == master
    file_slot = opened
    [pw_slot] = [s.slot for s in await list_slots(v) if s.kind == "passphrase"]
    key2 = tmp_path / "k2"
    km2 = KeyMaterial(keyfile=new_keyfile(key2))
    added = await add_slot(v, km2)
    assert added.kind == "keyfile" and added.created
    with pytest.raises(KeySlotError, match="--force"):
        await remove_slot(v, file_slot)
    # passwd with the vault opened by a key file needs the slot named
    with pytest.raises(KeySlotError, match="--slot"):
        await change_passphrase(v, PW2)
    new_pw, old_pw = await change_passphrase(v, PW2, pw_slot)
    assert old_pw.slot == pw_slot and new_pw.kind == "passphrase"
    await remove_slot(v, file_slot, force=True)
    await v.close()

    with pytest.raises(WrongKeyError, match="key file given opens none of the 2"):
        await Vault.open(LocalStore(vault), km_file)
    with pytest.raises(WrongKeyError, match="passphrase given opens none"):
        await Vault.open(LocalStore(vault), KeyMaterial(passphrase=PW))
    for km in (km2, KeyMaterial(passphrase=PW2)):
        v = await Vault.open(LocalStore(vault), km)
        assert v.keyring._master == master and len(await v.list_points()) == 1
        await v.close()
    assert _data_objects(vault) == before
    assert want


async def test_old_slots_without_created_still_load(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    km = KeyMaterial(keyfile=new_keyfile(tmp_path / "vault.key"))
    await (await Vault.create(LocalStore(vault), km)).close()
    [slot] = (vault / "keys").iterdir()
    doc = json.loads(slot.read_bytes())
    del doc["created"]  # as written before the field existed
    slot.write_bytes(json.dumps(doc, sort_keys=True).encode())
    v = await Vault.open(LocalStore(vault), km)
    [info] = await list_slots(v)
    await v.close()
    assert info.slot == slot.name and info.created is None and info.in_use
    assert info.kind == "keyfile" and info.error is None


async def test_orphan_slot_of_an_interrupted_init_is_skipped(tmp_path: Path) -> None:
    """A slot that opens with the key but wraps another master key (an init interrupted
    before its config, then run again with the same key file) does not stop open."""
    vault = tmp_path / "vault"
    km = KeyMaterial(keyfile=new_keyfile(tmp_path / "vault.key"))
    v = await Vault.create(LocalStore(vault), km)
    master = v.keyring._master
    await v.close()
    orphan, doc = wrap(os.urandom(64), km)
    (vault / "keys" / "0000000000000000").write_bytes(doc)  # listed first
    v = await Vault.open(LocalStore(vault), km)
    assert v.keyring._master == master and v.slot != "0000000000000000"
    slots = await list_slots(v)
    await v.close()
    assert len(slots) == 2 and orphan


async def test_damaged_slots_are_listed_and_do_not_count(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    km = KeyMaterial(keyfile=new_keyfile(tmp_path / "vault.key"))
    await (await Vault.create(LocalStore(vault), km)).close()
    (vault / "keys" / "00000000000000aa").write_text('{"kdf": 1}')
    v = await Vault.open(LocalStore(vault), km)
    slots = {s.slot: s for s in await list_slots(v)}
    assert slots["00000000000000aa"].kind == "damaged" and slots["00000000000000aa"].error
    [good] = [s for s in slots.values() if s.in_use]
    # a damaged slot is no way in: the good one is still the last usable one
    with pytest.raises(KeySlotError, match="last usable"):
        await remove_slot(v, good.slot, force=True)
    await remove_slot(v, "00000000000000aa")
    await v.close()
    assert [p.name for p in (vault / "keys").iterdir()] == [good.slot]
