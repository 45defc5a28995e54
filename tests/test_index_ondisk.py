"""The on-disk block index (vault/indexdb.py) against the in-memory one (#16): the same
answers on the same vault, a restore through it byte for byte the same, a build killed
with SIGKILL and a prune that rewrote the index objects both detected and rebuilt."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.digest import DiskDigest, fingerprint
from common.labels import CRASH
from procserver.vaultaccess import VaultAccess
from tests.helpers import run_cli
from vault import names
from vault.index import BlockIndex, Index, open_index
from vault.indexdb import DiskIndex
from vault.indexopen import open_block_index
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile
from vault.pack import PackEntry
from vault.point import Point
from vault.prune import prune
from vault.repo import Vault
from vault.restore import restore_point
from vault.retention import Retention
from vault.store.local import LocalStore
from vault.writer import CycleWriter, DiskSpec

BS = 64 * 1024
ROOT = Path(__file__).resolve().parent.parent


def _data(n: int, salt: bytes) -> bytes:
    """A small distinct block: what the index holds is its count, not its size."""
    return salt + n.to_bytes(8, "little") + bytes(2048)


async def _point(vault: Vault, machine: str, cycle: str, blocks: dict[int, bytes],
                 nblocks: int, *, base: Point | None = None, every: int = 40) -> Point:
    """A point of one disk of ``nblocks`` blocks written through the writer, with a
    checkpoint (an index object) every ``every`` blocks."""
    with ThreadPoolExecutor(2) as ex:
        w = CycleWriter(vault, Index(), ex, machine=machine, cycle=cycle,
                        disks=[DiskSpec("d0", nblocks * BS, BS)], full=base is None,
                        base=base)
        items = sorted(blocks.items())
        for i in range(0, len(items), every):
            await w.add([(0, n, b) for n, b in items[i:i + every]])
            await w.checkpoint()
        digest = DiskDigest()
        for n in range(nblocks):
            b = blocks.get(n)
            digest.update(fingerprint(b if b is not None else bytes(BS)))
        return await w.finish({"d0": digest.hexdigest()}, CRASH)


async def _build(root: Path) -> None:
    vault = await Vault.create(LocalStore(root / "vault"),
                               KeyMaterial(keyfile=new_keyfile(root / "vault.key")))
    a = {n: _data(n, b"A") for n in range(0, 600, 2)}
    p1 = await _point(vault, "a", "c1", a, 600)
    # A delta on it: some blocks changed, some shared with machine b.
    a2 = {n: _data(n, b"A2") for n in range(0, 600, 7)}
    await _point(vault, "a", "c2", {**a, **a2}, 600, base=p1)
    # Machine b: an old full point (forgotten by the prune below), then a new one
    # sharing half its blocks with a.
    await _point(vault, "b", "c1", {n: _data(n, b"B") for n in range(300)}, 300)
    b2 = {n: _data(n, b"A") if n % 2 == 0 else _data(n, b"B2") for n in range(0, 300)}
    await _point(vault, "b", "c2", b2, 300)
    await vault.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ondisk")
    asyncio.run(_build(root))
    return root


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Path:
    """A copy of the built vault of the test's own (a prune changes it)."""
    shutil.copytree(built, tmp_path / "v")
    return tmp_path / "v"


async def _open(root: Path) -> Vault:
    return await Vault.open(LocalStore(root / "vault"),
                            KeyMaterial(keyfile=read_keyfile(root / "vault.key")))


def _same(disk: BlockIndex, mem: Index) -> None:
    assert set(disk.objects) == mem.objects
    assert set(disk.packs) == mem.packs
    assert len(disk) == len(mem)
    assert dict(disk.entries.items()) == mem.entries
    ids = list(mem.entries)
    strangers = [secrets.token_bytes(32) for _ in range(50)]
    assert disk.lookup(ids + strangers) == mem.entries
    for b in ids[::17] + strangers[:5]:
        assert disk.get(b) == mem.get(b)
        assert (b in disk) == (b in mem)


async def test_same_answers_as_the_memory_index(built: Path, tmp_path: Path) -> None:
    vault = await _open(built)
    mem = await vault.load_index()
    assert len(mem.objects) > 20 and len(mem) > 800  # many objects, shared blocks
    disk = await open_block_index(vault, index_dir=tmp_path / "idx", memory=0)
    try:
        assert isinstance(disk, DiskIndex)
        _same(disk, mem)
    finally:
        disk.close()
    # Opened again: nothing is loaded again, the saved filter is used, same answers.
    again = DiskIndex.open(tmp_path / "idx", vault.config.vault_id)
    try:
        assert again.discarded is None
        assert await vault.refresh_index(again) is again
        _same(again, mem)
    finally:
        again.close()
    # Within the memory budget, the in-memory index.
    small = await open_block_index(vault, index_dir=tmp_path / "idx", memory=1 << 30)
    assert isinstance(small, Index)
    await vault.close()


entry_lists = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3),
                                 st.integers(0, 1 << 40), st.integers(1, 1 << 20)),
                       max_size=30)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(objects=st.lists(entry_lists, max_size=6))
def test_disk_index_is_a_dict_model(tmp_path: Path, objects: list[list[tuple[int, int, int,
                                                                                int]]]) -> None:
    """Any sequence of index objects (blocks listed again by later objects, in other
    packs): the table answers as the dict does."""
    d = tmp_path / secrets.token_hex(4)
    disk, mem = DiskIndex.open(d, "v" * 32), Index()
    try:
        for i, obj in enumerate(objects):
            packs: dict[str, list[PackEntry]] = {}
            for b, p, off, ln in obj:
                packs.setdefault(f"{p:064x}", []).append(
                    PackEntry(b.to_bytes(32, "big"), off, ln))
            disk.add_object(f"index/{i:064x}", packs)
            mem.add_object(f"index/{i:064x}", packs)
        _same(disk, mem)
    finally:
        disk.close()


async def test_restore_through_it_is_byte_exact(built: Path, tmp_path: Path) -> None:
    vault = await _open(built)
    try:
        for p in await vault.list_points():
            mem_out, disk_out = tmp_path / p.id / "mem", tmp_path / p.id / "disk"
            [m] = await restore_point(vault, p, mem_out)
            # A one-byte budget: the on-disk path whatever the vault's size.
            [d] = await restore_point(vault, p, disk_out, index_dir=tmp_path / "idx",
                                      index_memory=1)
            assert m.digest == d.digest == p.disks[0].digest
            assert Path(m.path).read_bytes() == Path(d.path).read_bytes()
        assert list((tmp_path / "idx").glob("*.index.sqlite"))
        # The command, through the index the restores above left (brought up to date).
        latest = (await vault.list_points("a"))[-1]
        r = await asyncio.to_thread(
            run_cli, "restore", "--vault", f"file://{built / 'vault'}", "--key-file",
            str(built / "vault.key"), "--machine", "a", "--out", str(tmp_path / "cli"),
            "--index-dir", str(tmp_path / "idx"), "--index-memory-mib", "0", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["point"] == latest.id
        assert ((tmp_path / "cli" / "d0.img").read_bytes()
                == (tmp_path / latest.id / "mem" / "d0.img").read_bytes())
    finally:
        await vault.close()


_CHILD = """
import asyncio, sys
from pathlib import Path
from vault.indexdb import DiskIndex
from vault.keyslots import KeyMaterial, read_keyfile
from vault.repo import Vault
from vault.store.local import LocalStore
from vault import names

async def main(root, idx, half):
    vault = await Vault.open(LocalStore(root / "vault"),
                             KeyMaterial(keyfile=read_keyfile(root / "vault.key")))
    index = DiskIndex.open(idx, vault.config.vault_id)
    n = 0
    async for info in vault.store.list(names.INDEX):
        vault._load_index_object(index, info.name, await vault.store.get(info.name))
        n += 1
        if n == half:
            print("half", flush=True)
            sys.stdin.readline()  # killed here, in the middle of the build
    print("whole", flush=True)

asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""


async def test_killed_mid_build_is_completed_at_restart(built: Path, tmp_path: Path) -> None:
    vault = await _open(built)
    mem = await vault.load_index()
    half = len(mem.objects) // 2
    idx = tmp_path / "idx"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(built), str(idx), str(half),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    try:
        assert await child.stdout.readline() == b"half\n"
        child.send_signal(signal.SIGKILL)
    finally:
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    left = DiskIndex.open(idx, vault.config.vault_id)
    try:
        assert len(left.objects) == half  # whole objects only, the rest missing
        assert len(left) < len(mem)
        restarted = await vault.refresh_index(left)
        assert restarted is left
        _same(restarted, mem)
    finally:
        left.close()
    # A file that is not a database at all: thrown away and built again.
    [db] = idx.glob("*.index.sqlite")
    for p in idx.iterdir():
        p.unlink()
    db.write_bytes(b"not a database" * 100)
    broken = await open_block_index(vault, index_dir=idx, memory=0)
    try:
        assert isinstance(broken, DiskIndex) and broken.discarded
        _same(broken, mem)
    finally:
        broken.close()
    # Cut short: the header opens, the pages past the cut are gone.
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size - (db.stat().st_size // 4096 // 2) * 4096)
    for p in idx.glob("*.filter"):
        p.unlink()
    cut = await open_block_index(vault, index_dir=idx, memory=0)
    try:
        assert isinstance(cut, DiskIndex) and cut.discarded
        _same(cut, mem)
    finally:
        cut.close()
    await vault.close()


async def test_stale_after_a_prune_is_rebuilt(copy: Path, tmp_path: Path) -> None:
    """A prune forgets machine b's old point and rewrites every index object: the
    process server's on-disk index notices at its next refresh (and at a restart)."""
    idx = tmp_path / "idx"
    access = VaultAccess(LocalStore(copy / "vault"),
                         KeyMaterial(keyfile=read_keyfile(copy / "vault.key")),
                         index_dir=idx, index_memory=0)
    await access.open()
    try:
        before = access.index
        assert isinstance(before, DiskIndex)
        old_objects = set(before.objects)
        vault = access.vault
        with ThreadPoolExecutor(2) as ex:
            report = await prune(vault, Retention(0, 0, 0, 1), ex,
                                 now=datetime.now(UTC) + timedelta(hours=2))
        assert report.forgotten and report.index_objects_replaced
        # Two at once (the uploader and a resync basis): one rebuilds, the other waits.
        after, other = await asyncio.gather(access.refresh_index(), access.refresh_index())
        assert after is other is access.index
        assert isinstance(after, DiskIndex)
        assert not set(after.objects) & old_objects
        mem = await vault.load_index()
        _same(after, mem)
        gone = {n async for n in _all_packs(vault)} ^ set(mem.packs)
        assert not gone  # every pack it names exists
    finally:
        await access.close()
    # Stale at a restart too: closed before the prune's rewrite is seen.
    vault = await _open(copy)
    reopened = await open_block_index(vault, index_dir=idx, memory=0)
    try:
        assert isinstance(reopened, DiskIndex)
        _same(reopened, mem)
    finally:
        reopened.close()
        await vault.close()


async def _all_packs(vault: Vault) -> AsyncIterator[str]:
    async for info in vault.store.list(names.PACKS):
        yield names.pack_id_of(info.name)


async def test_the_writer_deduplicates_against_it(copy: Path, tmp_path: Path) -> None:
    """The process server's path: a cycle written against the on-disk index stores only
    the blocks the vault lacks, the index learns its new object, and the point restores
    through it byte for byte."""
    access = VaultAccess(LocalStore(copy / "vault"),
                         KeyMaterial(keyfile=read_keyfile(copy / "vault.key")),
                         index_dir=tmp_path / "idx", index_memory=0)
    await access.open()
    try:
        index = await access.refresh_index()
        assert isinstance(index, DiskIndex)
        vault = access.vault
        known = {n: _data(n, b"A") for n in range(0, 200, 2)}  # machine a's blocks
        new = {n: _data(n, b"C") for n in range(1, 200, 2)}
        before = set(index.objects)
        with ThreadPoolExecutor(2) as ex:
            w = CycleWriter(vault, index, ex, machine="c", cycle="c1",
                            disks=[DiskSpec("d0", 200 * BS, BS)], full=True, base=None)
            await w.add([(0, n, b) for n, b in sorted({**known, **new}.items())])
            digest = DiskDigest()
            for n in range(200):
                digest.update(fingerprint({**known, **new}[n]))
            point = await w.finish({"d0": digest.hexdigest()}, CRASH)
        [obj] = set(index.objects) - before
        listed = open_index(vault.keyring, obj[len(names.INDEX):],
                            await vault.store.get(obj))
        stored = {e.block_id for entries in listed.values() for e in entries}
        assert stored == {vault.keyring.block_id(b) for b in new.values()}
        assert all(vault.keyring.block_id(b) in index for b in new.values())
        [r] = await restore_point(vault, point, tmp_path / "out", index_dir=tmp_path / "idx",
                                  index_memory=0)
        assert Path(r.path).read_bytes() == b"".join(
            ({**known, **new}[n]).ljust(BS, b"\0") for n in range(200))
    finally:
        await access.close()
