"""Bounded memory (#16): prune, check and rebuild-index streaming within a tiny memory
budget (forcing every spill path) give the results of the in-memory path on copies of
the same vault, and the external sort they use is an exact sorted set."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.digest import DiskDigest, fingerprint
from common.labels import CRASH
from siterecovery.cli import main
from tests.helpers import REPO, restore_all
from vault import names
from vault.check import check_vault
from vault.extsort import SortedSet
from vault.index import Index, open_index
from vault.indexdb import DiskIndex
from vault.indexopen import open_block_index
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile
from vault.mapranges import RANGE_BLOCKS
from vault.point import Point
from vault.prune import PruneReport, prune
from vault.rebuild import rebuild_index
from vault.repo import Vault
from vault.retention import Retention
from vault.store.faults import FaultStore
from vault.store.local import LocalStore
from vault.writer import CycleWriter, DiskSpec, MissingBlocksError

BS = 64 * 1024
NBLOCKS = 160
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
AGES = [100, 90, 80, 30, 29.5, 5.5, 5.2, 3, 0.5, 0.2]  # hours: some forgotten, some kept
TINY = 4096  # bytes: every streaming path spills


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _block(rng: random.Random) -> bytes:
    return rng.randbytes(16) + bytes(BS - 16)  # distinct, and compressed to next to nothing


async def _build(root: Path) -> dict[str, str]:
    """Two machines, a chain of points each (full, then deltas that change and zero some
    blocks), dated by ``AGES``; returns point id -> sha256 of its disk."""
    vault = await Vault.create(LocalStore(root / "vault"),
                               KeyMaterial(keyfile=new_keyfile(root / "vault.key")))
    # Frames of one block: the tests on this vault count what is read and held per
    # block and per range (a frame of several blocks is read by each range that needs
    # one of them; tests/test_pack_frames.py and the golden vaults cover larger frames).
    vault.frame_target = BS
    rng = random.Random(16)
    expected: dict[str, str] = {}
    with ThreadPoolExecutor(2) as ex:
        for machine in ("m1", "m2"):
            disk: dict[int, bytes] = {}
            base: Point | None = None
            for i, age in enumerate(AGES):
                if i == 0:
                    changed = {n: _block(rng) for n in range(0, NBLOCKS, 2)}
                else:
                    changed = {n: _block(rng) for n in rng.sample(range(NBLOCKS), 30)}
                    for n in rng.sample(sorted(disk), 3):
                        changed[n] = bytes(BS)  # becomes zero
                w = CycleWriter(vault, Index(), ex, machine=machine, cycle=f"c{i}",
                                disks=[DiskSpec("d0", NBLOCKS * BS, BS)], full=base is None,
                                base=base)
                await w.add([(0, n, b) for n, b in sorted(changed.items())])
                for n, b in changed.items():
                    if b == bytes(BS):
                        disk.pop(n, None)
                    else:
                        disk[n] = b
                digest = DiskDigest()
                image = hashlib.sha256()
                for n in range(NBLOCKS):
                    data = disk.get(n, bytes(BS))
                    digest.update(fingerprint(data))
                    image.update(data)
                base = await w.finish({"d0": digest.hexdigest()}, CRASH,
                                      _iso(NOW - timedelta(hours=age)))
                expected[base.id] = image.hexdigest()
    await vault.close()
    return expected


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("streaming")
    expected = asyncio.run(_build(root))
    return root, expected


async def _open(root: Path) -> Vault:
    return await Vault.open(LocalStore(root / "vault"),
                            KeyMaterial(keyfile=read_keyfile(root / "vault.key")))


def _copy(built: Path, to: Path) -> Path:
    shutil.copytree(built, to)
    return to


# -- the external sort ----------------------------------------------------------------------

def test_sorted_set_spills_and_merges_to_the_exact_sorted_set(tmp_path: Path) -> None:
    rng = random.Random(3)
    recs = [rng.randbytes(8) for _ in range(3000)]
    recs += rng.sample(recs, 500)  # repeats, across runs too
    with SortedSet(8, 0, temp_dir=tmp_path) as s:  # 16 records a run: > FAN_IN runs
        s.update(recs)
        assert s.spilled > 64
        want = sorted(set(recs))
        assert list(s) == want
        assert list(s) == want  # iterated again
        assert list(tmp_path.iterdir())
    assert not list(tmp_path.iterdir())  # closed: its directory is gone
    with SortedSet(8, 1 << 20, temp_dir=tmp_path) as s:  # fits: never touches the disk
        s.update(recs)
        assert list(s) == want and s.spilled == 0
    assert not list(tmp_path.iterdir())


# -- prune --------------------------------------------------------------------------------

def _comparable(r: PruneReport) -> dict[str, object]:
    return {**r.__dict__, "forgotten": sorted(r.forgotten), "rebased": sorted(r.rebased)}


async def test_prune_streaming_gives_the_in_memory_result(
        built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, expected = built
    mem_root = _copy(root, tmp_path / "mem")
    disk_root = _copy(root, tmp_path / "disk")
    reports: list[PruneReport] = []
    idx = tmp_path / "idx"
    # in memory, each disk marked at once; streamed, in ranges of 7 of its 160 blocks
    for r, kw in ((mem_root, {}), (disk_root, {"memory": TINY, "index_dir": idx,
                                               "temp_dir": tmp_path, "range_blocks": 7})):
        vault = await _open(r)
        with ThreadPoolExecutor(2) as ex:
            reports.append(await prune(vault, Retention(), ex, now=NOW, **kw))  # type: ignore[arg-type]
        await vault.close()
    mem, streamed = reports
    assert mem.forgotten and mem.rebased and mem.packs_deleted and mem.packs_repacked
    assert _comparable(streamed) == _comparable(mem)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("siterecovery-")] == []

    mv, dv = await _open(mem_root), await _open(disk_root)
    try:
        mi, di = await mv.load_index(), await dv.load_index()
        assert set(mi.entries) == set(di.entries)
        old = {names.pack_id_of(n) for n in (
            str(p.relative_to(root / "vault")) for p in (root / "vault" / "packs").rglob("*")
            if p.is_file())}
        same_place = {b: loc for b, loc in mi.entries.items() if loc.pack_id in old}
        assert {b: loc for b, loc in di.entries.items() if loc.pack_id in old} == same_place
        assert len(same_place) < len(mi.entries)  # some blocks were repacked
        assert mi.packs - old and len(di.packs - old) == len(mi.packs - old)
        points = {p.id for p in await dv.list_points()}
        assert points == {p.id for p in await mv.list_points()} == set(mem.kept)
        for p in await dv.list_points():
            assert await restore_all(dv, p, tmp_path / "out") == {"d0": expected[p.id]}
        # The index kept in the index directory was updated in place: same as the vault's.
        disk_index = DiskIndex.open(idx, dv.config.vault_id)
        try:
            assert set(disk_index.objects) == di.objects
            assert set(disk_index.packs) == di.packs
            assert dict(disk_index.entries.items()) == di.entries
            assert await dv.refresh_index(disk_index) is disk_index  # nothing to rebuild
        finally:
            disk_index.close()
        # Nothing is left to collect on either.
        for v in (mv, dv):
            with ThreadPoolExecutor(2) as ex:
                again = await prune(v, Retention(), ex, now=NOW, memory=TINY,
                                    temp_dir=tmp_path)
            assert (again.forgotten, again.packs_deleted, again.maps_deleted,
                    again.packs_repacked) == ([], 0, 0, 0)
    finally:
        await mv.close()
        await dv.close()


# -- rebuild-index ------------------------------------------------------------------------

def _damage_a_trailer(root: Path) -> str:
    """Cut the end of one pack (its trailer no longer authenticates); return its name."""
    pack = sorted(p for p in (root / "vault" / "packs").rglob("*") if p.is_file())[1]
    data = pack.read_bytes()
    pack.write_bytes(data[:-3] + bytes(3))
    return str(pack.relative_to(root / "vault"))


async def test_rebuild_streaming_gives_the_in_memory_result(
        built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, expected = built
    results = []
    for name, memory in (("mem", None), ("disk", TINY)):
        r = _copy(root, tmp_path / name)
        damaged = _damage_a_trailer(r)
        vault = await _open(r)
        before = await vault.load_index()
        report = await rebuild_index(vault, memory=memory)
        assert damaged in report.skipped and report.carried_over == [damaged]
        after = await vault.load_index()
        assert after.entries == before.entries  # nothing lost, the damaged pack carried over
        results.append((report, after, len(report.index_written)))
        point = (await vault.list_points())[-1]
        assert await restore_all(vault, point, tmp_path / "out") == {"d0": expected[point.id]}
        await vault.close()
    (mem, mem_index, mem_objects), (streamed, disk_index, disk_objects) = results
    assert (streamed.packs_indexed, streamed.blocks, streamed.skipped,
            streamed.carried_over) == (mem.packs_indexed, mem.blocks, mem.skipped,
                                       mem.carried_over)
    assert disk_index.entries == mem_index.entries and disk_index.packs == mem_index.packs
    assert mem_objects == 1 and disk_objects > 10  # a tiny budget: many small objects


# -- check --------------------------------------------------------------------------------

async def _damage(root: Path) -> None:
    """A pack deleted, one cut short, a block of another flipped, an index object (of
    other packs) and a map gone, a stray object: every kind of finding."""
    v = root / "vault"
    packs = sorted(p for p in (v / "packs").rglob("*") if p.is_file())
    hit = {packs[0].name, packs[3].name, packs[6].name}
    vault = await _open(root)
    for obj in sorted((v / "index").iterdir()):  # one listing none of those packs
        listed = open_index(vault.keyring, obj.name, obj.read_bytes())
        if not hit & set(listed):
            obj.unlink()
            break
    else:
        raise AssertionError("every index object lists a damaged pack")
    await vault.close()
    packs[0].unlink()
    packs[3].write_bytes(packs[3].read_bytes()[:100])
    data = bytearray(packs[6].read_bytes())
    data[40] ^= 0x10
    packs[6].write_bytes(bytes(data))
    sorted((v / "maps").iterdir())[5].unlink()
    (v / "packs" / "zz").mkdir()
    (v / "packs" / "zz" / "stray").write_bytes(b"x")


async def test_check_streaming_finds_what_the_in_memory_check_finds(
        built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, _ = built
    for damaged in (False, True):
        r = _copy(root, tmp_path / f"damaged-{damaged}")
        if damaged:
            await _damage(r)
        km = KeyMaterial(keyfile=read_keyfile(r / "vault.key"))
        for read_data, subset in ((False, None), (True, None), (True, 40.0)):
            docs = []
            # in memory and spilled; each disk at once (the default range is larger than
            # it), a block at a time, and in ranges that do not divide it
            for memory, span in ((None, RANGE_BLOCKS), (TINY, RANGE_BLOCKS), (None, 1),
                                 (TINY, 7)):
                with ThreadPoolExecutor(2) as ex:
                    report = await check_vault(LocalStore(r / "vault"), km, read_data=read_data,
                                               subset=subset, executor=ex, memory=memory,
                                               temp_dir=tmp_path, range_blocks=span)
                docs.append(report.to_json())
            assert all(d == docs[0] for d in docs[1:])
            if subset is not None:  # a disk whose blocks were not all read has no digest
                counts = docs[0]["counts"]  # (which packs a subset reads varies by vault)
                assert damaged or counts["digests_skipped"] + counts["digests_verified"] == 20  # type: ignore[index]
                continue
            kinds = {p["kind"] for p in docs[0]["problems"]}  # type: ignore[attr-defined]
            if damaged:
                assert {"missing", "truncated", "unrestorable", "unindexed", "stray"} <= kinds
                assert ("damaged" in kinds) == read_data
            else:
                assert kinds == set()
                assert docs[0]["counts"]["digests_verified" if read_data else "points"] == 20  # type: ignore[index]
    assert [p for p in tmp_path.iterdir() if p.name.startswith("siterecovery-")] == []


# -- the verbs ------------------------------------------------------------------------------

def test_verbs_take_a_memory_budget(built: tuple[Path, dict[str, str]], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = built
    r = _copy(root, tmp_path / "v")
    vault = ["--vault", f"file://{r / 'vault'}", "--key-file", str(r / "vault.key")]
    tmp, idx = tmp_path / "tmp", tmp_path / "idx"
    tmp.mkdir()

    def run(*args: str) -> dict[str, object]:
        assert main([*args, *vault, "--memory-mib", "0", "--json"]) == 0
        doc: dict[str, object] = json.loads(capsys.readouterr().out)
        return doc

    assert run("prune", "--index-dir", str(idx), "--temp-dir", str(tmp))["forgotten"]
    assert [p.name for p in idx.iterdir() if p.name.endswith(".index.sqlite")]
    written = run("rebuild-index")["index_written"]
    assert isinstance(written, list) and len(written) > 1  # no budget: a few packs each
    assert run("check", "--temp-dir", str(tmp))["ok"]
    assert list(tmp.iterdir()) == []
    with pytest.raises(SystemExit) as exc:
        main(["check", *vault, "--memory-mib", "-1"])
    assert exc.value.code == 2 and "not a budget in MiB" in capsys.readouterr().err


# -- the writer's dedup lookups -------------------------------------------------------------

async def test_writer_dedups_and_checks_its_maps_in_batches(
        built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, _ = built
    r = _copy(root, tmp_path / "v")
    vault = await _open(r)
    index = await open_block_index(vault, index_dir=tmp_path / "idx", memory=0)
    try:
        assert isinstance(index, DiskIndex)
        old = (await vault.list_points())[-1]
        known = (await vault.resolve_map(old, "d0")).blocks  # block number -> id
        olddata = {}
        for n, bid in known.items():
            olddata[n] = await vault.read_block(bid, index)
        rng = random.Random(7)
        new = {n: _block(rng) for n in range(NBLOCKS) if n not in known}
        disk = {**olddata, **new, 0: olddata[min(olddata)]}  # block 0 repeats a known one
        with ThreadPoolExecutor(2) as ex:
            w = CycleWriter(vault, index, ex, machine="m3", cycle="c0",
                            disks=[DiskSpec("d0", NBLOCKS * BS, BS)], full=True, base=None)
            items = sorted(disk.items())
            for i in range(0, len(items), 7):
                await w.add([(0, n, b) for n, b in items[i:i + 7]])
            digest = DiskDigest()
            for n in range(NBLOCKS):
                digest.update(fingerprint(disk.get(n, bytes(BS))))
            point = await w.finish({"d0": digest.hexdigest()}, CRASH)
            assert w.logical_bytes == len(new) * BS  # the known blocks were not stored again
            image = hashlib.sha256(b"".join(disk.get(n, bytes(BS)) for n in range(NBLOCKS)))
            assert await restore_all(vault, point, tmp_path / "out") == {
                "d0": image.hexdigest()}
            # A map whose blocks are in no index is never written: counted in batches.
            w = CycleWriter(vault, index, ex, machine="m3", cycle="c1",
                            disks=[DiskSpec("d0", NBLOCKS * BS, BS)], full=True, base=None)
            fake = [(0, n, bytes([n + 1]) * 32) for n in range(5)]
            w.replay([*fake, (0, 9, next(iter(known.values())))])
            assert w.unindexed() == 5  # what an uploader checks after a prune ran
            with pytest.raises(MissingBlocksError, match="5 block"):
                await w.finish({"d0": digest.hexdigest()}, CRASH)
    finally:
        index.close()
        await vault.close()


# -- kill -9 ------------------------------------------------------------------------------

class _Recording(FaultStore):
    """Records the name of every put and delete, in order."""

    def __init__(self, inner: LocalStore) -> None:
        super().__init__(inner)
        self.log: list[str] = []

    async def put(self, name: str, data: bytes | bytearray) -> None:
        self.log.append("put " + name)
        await super().put(name, data)

    async def put_file(self, name: str, fd: int, length: int) -> None:
        self.log.append("put " + name)
        await super().put_file(name, fd, length)

    async def delete(self, name: str) -> None:
        self.log.append("delete " + name)
        await super().delete(name)


_CHILD = """
import asyncio, sys
from concurrent.futures import ThreadPoolExecutor
from vault.keyslots import KeyMaterial, read_keyfile
from vault.prune import prune
from vault.repo import Vault
from vault.retention import Retention
from vault.store.open import open_store

async def main(url, key, index_dir, temp_dir):
    v = await Vault.open(open_store(url), KeyMaterial(keyfile=read_keyfile(key)))
    with ThreadPoolExecutor(2) as ex:
        await prune(v, Retention(), ex, memory=0, index_dir=index_dir, temp_dir=temp_dir)
    await v.close()

asyncio.run(main(*sys.argv[1:]))
"""


async def _prune_child(url: str, root: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """A streaming prune (budget 0) in a process of its own (a light one: the vault
    alone, not the whole command line)."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _CHILD, url, str(root / "vault.key"),
                         str(tmp / "idx"), str(tmp)],
        capture_output=True, text=True, cwd=REPO, timeout=300)


async def test_streaming_prune_killed_mid_index_swap_then_run_again(
        built: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, expected = built
    probe = _copy(root, tmp_path / "probe")
    store = _Recording(LocalStore(probe / "vault"))
    v = await Vault.open(store, KeyMaterial(keyfile=read_keyfile(probe / "vault.key")))
    with ThreadPoolExecutor(2) as ex:
        await prune(v, Retention(), ex, now=datetime.now(UTC), memory=TINY, temp_dir=tmp_path)
    await v.close()
    old_index = [i for i, m in enumerate(store.log, 1) if m.startswith("delete index/")]
    assert len(old_index) > 4
    # The process dies after half the old index objects are deleted: the vault has the
    # new index and some old objects, the index directory's table still the old ones.
    r = _copy(root, tmp_path / "v")
    crash = old_index[len(old_index) // 2]
    killed = await _prune_child(f"fault+file://{r / 'vault'}?crash_after={crash}", r,
                                tmp_path)
    assert killed.returncode == 137, killed.stderr
    again = await _prune_child(f"file://{r / 'vault'}", r, tmp_path)
    assert again.returncode == 0, again.stderr
    vault = await _open(r)
    try:
        mem = await vault.load_index()
        disk_index = DiskIndex.open(tmp_path / "idx", vault.config.vault_id)
        try:
            assert await vault.refresh_index(disk_index) is disk_index  # updated, not stale
            assert dict(disk_index.entries.items()) == mem.entries
        finally:
            disk_index.close()
        for p in await vault.list_points():
            assert await restore_all(vault, p, tmp_path / "out") == {"d0": expected[p.id]}
    finally:
        await vault.close()
