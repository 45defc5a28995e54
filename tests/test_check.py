"""``check`` and ``rebuild-index`` beyond the golden corruptions: warnings, digests,
subsets, bounded reads, damaged trailers, interrupted rebuilds, the JSON document."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from siterecovery.checkcmds import parse_percent
from siterecovery.errors import UsageError
from tests.helpers import REPO, make_vault, open_vault, restore_all, run_cli, sha256
from tests.make_golden import DISK, SIZE, disk_versions
from tests.test_golden import P1, P2, Golden, _flip, _trailer_range, copy_golden, restore
from vault import check as check_mod
from vault import names
from vault.check import check_vault
from vault.checkdata import subset_of
from vault.checkreport import CheckReport
from vault.index import open_index
from vault.keyslots import KeyMaterial, read_keyfile
from vault.pack import build_pack
from vault.rebuild import rebuild_index
from vault.store.local import LocalStore
from vault.writer import CycleWriter, DiskSpec

BS = 64 * 1024


async def _check(g: Golden | tuple[Path, Path], *, read_data: bool = False) -> CheckReport:
    vault, key = (g.vault, g.key) if isinstance(g, Golden) else g
    return await check_vault(LocalStore(vault), KeyMaterial(keyfile=read_keyfile(key)),
                             read_data=read_data)


def _errors(report: CheckReport) -> list[tuple[str, str]]:
    return [(p.object, p.kind) for p in report.errors]


# -- options -------------------------------------------------------------------------------

def test_subset_is_deterministic_and_exact() -> None:
    ids = [f"{i:064x}" for i in range(200)]
    ten = subset_of(ids, 10)
    assert len(ten) == 20 and ten == subset_of(list(reversed(ids)), 10)
    assert ten <= subset_of(ids, 50)  # a larger share reads a superset
    assert len(subset_of(ids, 0.1)) == 1 and subset_of(ids, 100) == set(ids)
    assert subset_of([], 50) == set()


def test_parse_percent() -> None:
    assert parse_percent("10%") == 10 and parse_percent(" 0.5 ") == 0.5
    for bad in ("0%", "101", "ten", "-5%", ""):
        with pytest.raises(UsageError):
            parse_percent(bad)


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    for extra in (["--subset", "10%"], ["--read-data", "--subset", "0%"]):
        r = run_cli("check", "--vault", g.url, "--key-file", str(g.key), *extra)
        assert r.returncode == 2, r.stderr
    r = run_cli("check", "--vault", g.url)
    assert r.returncode == 2 and "--key-file" in r.stderr


def test_vault_modules_stay_independent() -> None:
    code = ("import sys, vault.check, vault.rebuild; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('siterecovery', 'procserver', 'configserver', 'mobility')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# -- what check reports ------------------------------------------------------------------

async def test_unindexed_and_stray_packs_are_warnings(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    v = await open_vault(g.vault, g.key)
    pack_id = names.random_id()
    data, _ = build_pack(v.keyring, pack_id, [(v.keyring.block_id(b"x" * 100), b"x" * 100)],
                         zstandard.ZstdCompressor())
    await v.put_pack(pack_id, data)  # a writer crashed before its index object
    await v.close()
    (g.vault / "packs" / "zz").mkdir()
    (g.vault / "packs" / "zz" / "junk").write_bytes(b"junk")
    report = await _check(g, read_data=True)
    assert report.errors == []
    assert {(p.object, p.kind) for p in report.warnings} == {
        (names.pack_name(pack_id), "unindexed"), ("packs/zz/junk", "stray")}
    assert report.counts["packs_read"] == 3 and report.counts["blocks_read"] == 8
    r = run_cli("check", "--vault", g.url, "--key-file", str(g.key))
    assert r.returncode == 0 and ": no problems, 2 warnings" in r.stdout
    r = run_cli("rebuild-index", "--vault", g.url, "--key-file", str(g.key), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["packs_indexed"] == 3
    report = await _check(g)
    assert [p.kind for p in report.problems] == ["stray"]


async def _vault_with_wrong_digest(tmp: Path) -> tuple[Path, Path, str]:
    _url, key = await make_vault(tmp)
    v = await open_vault(tmp / "vault", key)
    data = disk_versions()[0]
    with ThreadPoolExecutor(2) as ex:
        w = CycleWriter(v, await v.load_index(), ex, machine="m", cycle="c" * 32,
                        disks=[DiskSpec(DISK, SIZE, BS)], full=True, base=None)
        await w.add([(0, n, data[n * BS:(n + 1) * BS]) for n in range((SIZE + BS - 1) // BS)])
        point = await w.finish({DISK: "0" * 64}, "crash")  # the agent sent a wrong digest
    await v.close()
    return tmp / "vault", key, point.id


async def test_digest_mismatch_is_found_by_read_data_only(tmp_path: Path) -> None:
    vault, key, point_id = await _vault_with_wrong_digest(tmp_path)
    assert (await _check((vault, key))).problems == []  # structure is fine
    report = await _check((vault, key), read_data=True)
    assert _errors(report) == [(names.POINTS + point_id, "mismatch")]
    assert "records 0000000000000000" in report.errors[0].reason


async def test_missing_base_point_is_named(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    g.path(names.POINTS + P1).unlink()
    report = await _check(g, read_data=True)
    assert _errors(report) == [(names.POINTS + P1, "missing"),
                               (names.POINTS + P2, "unrestorable")]


async def test_damaged_extra_slot_is_reported_and_the_rest_checked(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    (g.vault / "keys" / "00000000000000aa").write_text("{not json")
    report = await _check(g, read_data=True)
    assert _errors(report) == [("keys/00000000000000aa", "damaged")]
    assert report.counts["digests_verified"] == 2 and not report.wrong_key
    code, text = restore(g, P2, tmp_path / "out")
    assert code == 0, text  # one bad slot does not lock the others out


async def test_damaged_config_does_not_stop_the_data_check(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    _flip(g.path(names.CONFIG), 40)
    report = await _check(g, read_data=True)
    assert _errors(report) == [(names.CONFIG, "damaged")]
    assert report.counts["digests_verified"] == 2


async def test_index_entry_outside_the_trailer_is_a_mismatch(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    v = await open_vault(g.vault, g.key)
    index_name = g.index_of[g.delta_pack]
    listed = open_index(v.keyring, index_name[len(names.INDEX):], g.path(index_name).read_bytes())
    (pack_id, entries), = listed.items()
    e = entries[0]
    bogus = type(e)(e.block_id, e.offset + 1, e.length - 1)  # a writer bug, authenticated
    await v.put_index({pack_id: [*entries, bogus]})
    await v.close()
    report = await _check(g, read_data=True)
    assert (g.delta_pack, "mismatch") in _errors(report)
    assert (g.delta_pack, "damaged") in _errors(report)  # the bogus location fails too


async def test_reads_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = await copy_golden(tmp_path)
    monkeypatch.setattr(check_mod, "CHUNK", 70_000)
    biggest = 0

    class Counting(LocalStore):
        async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
            nonlocal biggest
            data = await super().get(name, offset, length)
            if name.startswith(names.PACKS):
                biggest = max(biggest, len(data))
            return data

    report = await check_vault(Counting(g.vault), KeyMaterial(keyfile=read_keyfile(g.key)),
                               read_data=True)
    assert report.problems == [] and report.counts["digests_verified"] == 2
    assert 0 < biggest <= 70_000


async def test_json_document_and_data_dir(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    data_dir = tmp_path / "embedded"
    data_dir.mkdir()
    shutil.move(g.vault, data_dir / "vault")
    shutil.copy(g.key, data_dir / "vault.key")
    r = run_cli("check", "--data-dir", str(data_dir), "--read-data")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check --read-data" in r.stderr and "100%" in r.stderr  # progress on stderr
    _flip(data_dir / "vault" / g.full_pack, 100)
    r = run_cli("check", "--data-dir", str(data_dir), "--read-data", "--json")
    assert r.returncode == 3
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 3 and doc["errors"] == 3
    assert doc["problems"][0] == {
        "object": g.full_pack, "kind": "damaged", "severity": "error",
        "reason": doc["problems"][0]["reason"]}
    assert {p["object"] for p in doc["problems"]} == {
        g.full_pack, names.POINTS + P1, names.POINTS + P2}
    assert r.stderr == ""  # no progress lines with --json


# -- rebuild-index ---------------------------------------------------------------------

async def test_rebuild_skips_a_damaged_trailer_but_keeps_its_old_entries(tmp_path: Path
                                                                        ) -> None:
    g = await copy_golden(tmp_path)
    off, t = _trailer_range(g.path(g.full_pack))
    _flip(g.path(g.full_pack), off + t // 2)
    old = sorted(p.name for p in (g.vault / "index").iterdir())
    r = run_cli("rebuild-index", "--vault", g.url, "--key-file", str(g.key))
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"ERROR: {g.full_pack}: damaged: trailer: authentication failed; skipped (its " \
           "entries in the old index were kept)" in r.stdout
    now = sorted(p.name for p in (g.vault / "index").iterdir())
    assert len(now) == 1 and not set(now) & set(old)
    v = await open_vault(g.vault, g.key)
    try:
        for p in await v.list_points():
            got = await restore_all(v, p, tmp_path / "out")
            want = next(x for x in json.loads((REPO / "tests/fixtures/golden/expected.json")
                                              .read_text())["points"] if x["id"] == p.id)
            assert got == {DISK: want["disks"][DISK]["sha256"]}
    finally:
        await v.close()


async def test_rebuild_without_an_old_index_loses_only_the_damaged_pack(tmp_path: Path
                                                                       ) -> None:
    g = await copy_golden(tmp_path)
    shutil.rmtree(g.vault / "index")
    off, t = _trailer_range(g.path(g.delta_pack))
    _flip(g.path(g.delta_pack), off + t // 2)
    v = await open_vault(g.vault, g.key)
    try:
        report = await rebuild_index(v)
    finally:
        await v.close()
    assert list(report.skipped) == [g.delta_pack] and report.carried_over == []
    assert report.packs_indexed == 1 and report.blocks == 5
    check = await _check(g)
    assert (g.delta_pack, "unindexed") in [(p.object, p.kind) for p in check.warnings]
    assert _errors(check) == [(names.POINTS + P2, "unrestorable")]  # point 1 is whole


async def test_interrupted_rebuild_can_run_again(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    # Mutations: 1 the lock, 2 the new index object, 3 deleting the first old one: die there.
    r = run_cli("rebuild-index", "--vault", f"fault+{g.url}?crash_after=3", "--key-file",
                str(g.key))
    assert r.returncode == 137, r.stdout + r.stderr
    assert len(list((g.vault / "index").iterdir())) == 3  # old and new: never none
    assert (await _check(g, read_data=True)).problems == []  # duplicates are harmless
    r = run_cli("rebuild-index", "--vault", g.url, "--key-file", str(g.key))
    assert r.returncode == 0, r.stdout + r.stderr  # the dead run's lock is stale
    assert "deleted 3 old index objects" in r.stdout
    assert len(list((g.vault / "index").iterdir())) == 1
    assert not [p for p in (g.vault / "locks").rglob("*") if p.is_file()]
    out = tmp_path / "out"
    code, text = restore(g, P1, out)
    assert code == 0, text
    assert sha256(out / f"{DISK}.img") == json.loads(
        (REPO / "tests/fixtures/golden/expected.json").read_text())["points"][0]["disks"][
        DISK]["sha256"]



async def test_rebuild_refuses_to_empty_the_index_when_no_pack_is_found(tmp_path: Path
                                                                       ) -> None:
    g = await copy_golden(tmp_path)
    shutil.rmtree(g.vault / "packs")
    r = run_cli("rebuild-index", "--vault", g.url, "--key-file", str(g.key))
    assert r.returncode == 1 and "refusing" in r.stderr
    assert len(list((g.vault / "index").iterdir())) == 2
