"""Invariant 5: storage is untrusted. Tampering, swapping, truncation and wrong keys
are detected and reported with the object named; wrong data is never written."""

from __future__ import annotations

import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import make_disk, make_vault, open_vault, run_cli, sha256, write_full_point
from vault import names
from vault.crypto import Keyring, ObjectType, seal, unseal
from vault.errors import FormatError, IntegrityError, TransientStoreError
from vault.keyslots import new_keyfile, unwrap
from vault.maps import open_map
from vault.materialize import materialize
from vault.pack import open_block
from vault.store.local import LocalStore
from vault.store.protocol import BlobStore
from vault.store.wrapper import StoreWrapper

BS = 64 * 1024


async def _vault_with_point(tmp: Path) -> tuple[Path, Path, str]:
    """A vault holding one machine's point of a 2 MiB disk; returns (vault dir, key, sha)."""
    _url, key = await make_vault(tmp)
    disk = tmp / "disk.img"
    make_disk(disk, 2 << 20, seed=3)
    data = disk.read_bytes()
    v = await open_vault(tmp / "vault", key)
    await write_full_point(v, data)
    await v.close()
    return tmp / "vault", key, sha256(disk)


def _restore(vault: Path, key: Path, out: Path) -> tuple[int, str]:
    r = run_cli("restore", "--vault", f"file://{vault}", "--key-file", str(key),
                "--out", str(out))
    return r.returncode, r.stderr


def _objects(vault: Path, prefix: str) -> list[Path]:
    return sorted(p for p in (vault / prefix).rglob("*") if p.is_file())


async def test_restore_from_vault_alone_is_exact(tmp_path: Path) -> None:
    vault, key, want = await _vault_with_point(tmp_path)
    code, err = _restore(vault, key, tmp_path / "out")
    assert code == 0, err
    assert sha256(tmp_path / "out" / "sda.img") == want


async def test_wrong_key_is_refused(tmp_path: Path) -> None:
    vault, _key, _ = await _vault_with_point(tmp_path)
    other = tmp_path / "other.key"
    new_keyfile(other)
    code, err = _restore(vault, other, tmp_path / "out")
    assert code == 4
    assert "opens none of the 1 key slot" in err
    assert not (tmp_path / "out" / "sda.img").exists()


@pytest.mark.parametrize("prefix", [names.PACKS, names.INDEX, names.MAPS, names.POINTS,
                                    names.CONFIG])
async def test_flipped_bit_is_detected_and_named(tmp_path: Path, prefix: str) -> None:
    vault, key, _ = await _vault_with_point(tmp_path)
    victim = _objects(vault, prefix)[0] if prefix != names.CONFIG else vault / "config"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    victim.write_bytes(bytes(raw))
    code, err = _restore(vault, key, tmp_path / "out")
    assert code == 3, err
    assert "failed verification" in err
    rel = victim.relative_to(vault).as_posix()
    assert victim.name[:16] in err or rel in err
    assert not (tmp_path / "out" / "sda.img").exists()
    assert not (tmp_path / "out" / "sda.img.partial").exists()


async def test_truncated_pack_is_detected(tmp_path: Path) -> None:
    vault, key, _ = await _vault_with_point(tmp_path)
    pack = _objects(vault, names.PACKS)[0]
    with open(pack, "r+b") as f:
        f.truncate(os.path.getsize(pack) // 2)
    code, err = _restore(vault, key, tmp_path / "out")
    assert code == 3, err
    assert "truncated" in err and pack.name in err
    assert not (tmp_path / "out" / "sda.img").exists()


async def test_swapped_objects_are_detected(tmp_path: Path) -> None:
    # Storage answers for one object with another, validly sealed one.
    vault, key, _ = await _vault_with_point(tmp_path)
    point = _objects(vault, names.POINTS)[0]
    shutil.copy(point, vault / names.POINTS / ("f" * 64))
    code, err = _restore(vault, key, tmp_path / "out")
    assert code == 3
    assert "points/" + "f" * 64 in err
    # A map served under another map's name fails its AEAD (name-derived key and AD).
    v = await open_vault(vault, key)
    m = _objects(vault, names.MAPS)[0]
    with pytest.raises(IntegrityError, match="maps/" + "e" * 64):
        open_map(v.keyring, "e" * 64, m.read_bytes())
    await v.close()


def test_block_cannot_move_between_packs_or_types() -> None:
    k = Keyring(os.urandom(64))
    data = os.urandom(1000)
    bid = k.block_id(data)
    sealed = seal(k.aead(ObjectType.BLOCK, "a" * 64), ObjectType.BLOCK, "a" * 64, data,
                  nonce=bytes(12), extra=bid)
    assert open_block(k, "a" * 64, bid, sealed) == data
    with pytest.raises(IntegrityError):
        open_block(k, "b" * 64, bid, sealed)  # moved to another pack
    with pytest.raises(IntegrityError):
        open_block(k, "a" * 64, k.block_id(b"other"), sealed)  # claims another id
    with pytest.raises(IntegrityError):
        unseal(k.aead(ObjectType.MAP, "a" * 64), ObjectType.MAP, "a" * 64, sealed,
               max_size=1 << 20)  # presented as another type
    with pytest.raises(IntegrityError):
        open_block(Keyring(os.urandom(64)), "a" * 64, bid, sealed)  # wrong key


def test_object_names_reveal_nothing() -> None:
    k = Keyring(os.urandom(64))
    assert k.block_id(bytes(100)) != Keyring(os.urandom(64)).block_id(bytes(100))


async def test_damaged_key_slot_does_not_lock_out_the_others(tmp_path: Path) -> None:
    vault, key, want = await _vault_with_point(tmp_path)
    (vault / names.KEYS / "0000000000000000").write_text("{not json")
    code, err = _restore(vault, key, tmp_path / "out")
    assert code == 0, err
    assert sha256(tmp_path / "out" / "sda.img") == want
    other = tmp_path / "other.key"
    new_keyfile(other)
    code, err = _restore(vault, other, tmp_path / "out2")
    assert code == 4 and "1 damaged: keys/0000000000000000" in err


async def test_excessive_kdf_parameters_are_refused(tmp_path: Path) -> None:
    import json

    from vault.keyslots import KeyMaterial, wrap

    _slot, doc = wrap(os.urandom(64), KeyMaterial(passphrase="pw"))
    slot = json.loads(doc)
    slot["kdf"]["p"] = 1 << 20  # storage asking us to burn CPU forever
    with pytest.raises(FormatError, match="excessive"):
        unwrap(json.dumps(slot).encode(), KeyMaterial(passphrase="pw"))
    assert unwrap(doc, KeyMaterial(passphrase="pw")) is not None
    assert unwrap(doc, KeyMaterial(passphrase="wrong")) is None


class _Outage(StoreWrapper):
    """Reads succeed ``budget`` times, then the store is unreachable."""

    def __init__(self, inner: BlobStore, budget: int) -> None:
        super().__init__(inner)
        self.budget, self.pack_gets = budget, 0
        self.url = "outage"

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith(names.PACKS):
            self.pack_gets += 1
            if self.budget == 0:
                raise TransientStoreError("storage unreachable")
            self.budget -= 1
        return await self.inner.get(name, offset, length)


async def test_interrupted_restore_resumes(tmp_path: Path) -> None:
    _url, key = await make_vault(tmp_path)
    disk = tmp_path / "disk.img"
    disk.write_bytes(random.Random(8).randbytes(40 << 20))  # incompressible: five packs
    v = await open_vault(tmp_path / "vault", key)
    point = await write_full_point(v, disk.read_bytes())
    with ThreadPoolExecutor(2) as ex:
        index = await v.load_index()
        packs = {loc.pack_id for loc in index.entries.values()}
        assert len(packs) >= 3
        out = str(tmp_path / "out.img")
        v.store = _Outage(LocalStore(tmp_path / "vault"), 2)
        with pytest.raises(TransientStoreError):
            await materialize(v, point, "sda", out, index=index, executor=ex)
        assert not os.path.exists(out)
        assert os.path.exists(out + ".partial.progress")  # kept for the next run
        v.store = counting = _Outage(LocalStore(tmp_path / "vault"), 10**6)
        await materialize(v, point, "sda", out, index=index, executor=ex)
    assert counting.pack_gets < len(packs)  # finished packs were not fetched again
    assert sha256(Path(out)) == sha256(disk)
    assert not os.path.exists(out + ".partial.progress")
    assert not os.path.exists(out + ".partial")
