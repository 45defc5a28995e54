"""Golden vectors: committed vaults (tests/fixtures/golden of format 1, golden2 of format 2
and golden3 of format 3, made by tests/make_golden.py) that this code must keep reading
byte for byte, and corruptions of them, made here on a copy, that both ``restore`` and ``check
--read-data`` must catch, through the real CLI."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import open_vault, run_cli, sha256
from tests.make_golden import BS, DISK, GOLDEN, GOLDEN2, GOLDEN3, MACHINE, SIZE, disk_versions
from vault import names
from vault.index import open_index
from vault.keyslots import new_keyfile
from vault.maps import FULL
from vault.pack import MAGIC, TAIL, PackEntry, parse_trailer

EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
P1, P2 = (str(p["id"]) for p in EXPECTED["points"])  # the full point, the delta point on it
#: the golden vault of each format
FORMAT_OF = {GOLDEN: 1, GOLDEN2: 2, GOLDEN3: 3}
EXPECTED_ALL = [p for src in FORMAT_OF
                for p in json.loads((src / "expected.json").read_text())["points"]]
#: every golden vault, for the tests each must pass
VAULTS = [pytest.param(src, id=f"format{fmt}") for src, fmt in FORMAT_OF.items()]


@dataclass
class Golden:
    """A private copy of the golden vault, and where its objects are."""

    root: Path
    fmt: int  # 1: golden, 2: golden2, 3: golden3
    p1: str  # the full point
    p2: str  # the delta point on it
    vault: Path
    key: Path
    slot: str  # keys/<slot>
    full_pack: str  # packs/.. of point 1 (blocks 0, 1, 3, 4, 5 at point 1)
    delta_pack: str  # packs/.. of point 2 (blocks 1, 5 at point 2)
    index_of: dict[str, str]  # pack object -> the index object listing it
    full_map: str  # maps/.. of point 1
    delta_map: str  # maps/.. of point 2
    shared_block: tuple[int, int]  # (offset, length) in full_pack of block 0, used by both
    p1_only_block: tuple[int, int]  # in full_pack: block 3 at point 1 (zero at point 2)

    @property
    def url(self) -> str:
        return f"file://{self.vault}"

    def path(self, name: str) -> Path:
        return self.vault / name


async def copy_golden(tmp: Path, src: Path = GOLDEN) -> Golden:
    root = tmp / "golden"
    shutil.copytree(src, root)
    vault, key = root / "vault", root / "vault.key"
    ids = [str(p["id"]) for p in json.loads((src / "expected.json").read_text())["points"]]
    v = await open_vault(vault, key)
    try:
        index = await v.load_index()
        p1, p2 = await v.read_point(ids[0]), await v.read_point(ids[1])
        m1, m2 = await v.resolve_map(p1, DISK), await v.resolve_map(p2, DISK)
        by_pack: dict[str, str] = {}
        for name in sorted(index.objects):
            for pack_id in open_index(v.keyring, name[len(names.INDEX):],
                                      (vault / name).read_bytes()):
                by_pack[names.pack_name(pack_id)] = name
        loc0, loc3 = index.entries[m1.blocks[0]], index.entries[m1.blocks[3]]
        assert m2.blocks[0] == m1.blocks[0] and 3 not in m2.blocks
        full_pack = names.pack_name(loc0.pack_id)
        delta_pack = names.pack_name(index.entries[m2.blocks[1]].pack_id)
        assert loc3.pack_id == loc0.pack_id and delta_pack != full_pack
        slots = [b.name async for b in v.store.list(names.KEYS)]
    finally:
        await v.close()
    assert len(slots) == 1
    return Golden(root, FORMAT_OF[src], p1.id, p2.id, vault, key, slots[0],
                  full_pack, delta_pack, by_pack,
                  names.MAPS + p1.disks[0].map, names.MAPS + p2.disks[0].map,
                  (loc0.offset, loc0.length), (loc3.offset, loc3.length))


def _flip(path: Path, pos: int, bit: int = 0x10) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= bit
    path.write_bytes(bytes(raw))


def _trailer_range(pack: Path) -> tuple[int, int]:
    raw = pack.read_bytes()
    t, magic = TAIL.unpack(raw[-TAIL.size:])
    assert magic == MAGIC
    return len(raw) - TAIL.size - t, t


def restore(g: Golden, point: str, out: Path, key: Path | None = None) -> tuple[int, str]:
    r = run_cli("restore", "--vault", g.url, "--key-file", str(key or g.key), "--point",
                point, "--out", str(out))
    return r.returncode, r.stdout + r.stderr


def check(g: Golden, *extra: str, key: Path | None = None) -> tuple[int, str]:
    r = run_cli("check", "--vault", g.url, "--key-file", str(key or g.key), *extra)
    return r.returncode, r.stdout + r.stderr


def _want(point_id: str) -> str:
    p = next(p for p in EXPECTED_ALL if p["id"] == point_id)
    return str(p["disks"][DISK]["sha256"])


def restores_and_checks_clean(g: Golden, out: Path) -> None:
    """Both points restore to their expected images; ``check --read-data`` finds
    nothing."""
    for pid in (g.p1, g.p2):
        code, text = restore(g, pid, out / pid[:8])
        assert code == 0, text
        assert sha256(out / pid[:8] / f"{DISK}.img") == _want(pid)
    code, text = check(g, "--read-data")
    assert code == 0 and "no problems" in text, text


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


# -- the valid vault -----------------------------------------------------------------

def test_expected_images_match_the_generator() -> None:
    import hashlib

    v1, v2 = disk_versions()
    assert len(v1) == SIZE and SIZE % BS == 1000  # a short last block
    assert not any(v1[2 * BS:3 * BS]) and not any(v2[3 * BS:4 * BS])  # zero blocks
    assert [hashlib.sha256(v).hexdigest() for v in (v1, v2)] == [_want(P1), _want(P2)]
    assert sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file()) < 1 << 20


async def test_golden_vault_layout_is_format_v1(tmp_path: Path) -> None:
    """Pins the on-storage format: if this fails, the format changed incompatibly
    (regenerate with tests/make_golden.py only on a deliberate format change)."""
    g = await copy_golden(tmp_path)
    objs = sorted(p.relative_to(g.vault).as_posix() for p in g.vault.rglob("*") if p.is_file())
    kinds = [o.split("/")[0] for o in objs]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "config": 1, "keys": 1, "index": 2, "maps": 2, "packs": 2, "points": 2}
    slot = json.loads(g.path(g.slot).read_bytes())
    assert slot["kind"] == "keyfile" and slot["kdf"] == {"name": "none"}
    assert len(base64.b64decode(slot["wrapped"])) == 64 + 16
    # Sealed-unit headers: version 1, object type, flags (never zstd for these), reserved.
    for name, otype in ((names.CONFIG, 1), (g.full_map, 6), (g.delta_map, 6),
                        (names.POINTS + P1, 5), *((n, 4) for n in g.index_of.values())):
        assert g.path(name).read_bytes()[:4] == bytes([1, otype, 0, 0]), name
    v = await open_vault(g.vault, g.key)
    try:
        assert v.config.format == 1 and v.config.block_size == BS
        points = await v.list_points()
        assert [p.id for p in points] == [P1, P2]
        p1, p2 = points
        assert (p1.machine, p1.base, p1.chain, p1.consistency) == (MACHINE, None, 0, "crash")
        assert (p2.base, p2.chain, p2.consistency) == (P1, 1, "app")
        assert [d.map_kind for d in (p1.disks[0], p2.disks[0])] == ["full", "delta"]
        full = await v.read_map(p1.disks[0].map, p1.format)
        delta = await v.read_map(p2.disks[0].map, p2.format)
        assert full.kind == FULL and sorted(full.blocks) == [0, 1, 3, 4, 5]
        assert sorted(delta.blocks) == [1, 2, 3, 5] and delta.blocks[3] == bytes(32)
        assert delta.blocks[2] == full.blocks[0]  # deduplicated
        for pack, count in ((g.full_pack, 5), (g.delta_pack, 2)):
            off, t = _trailer_range(g.path(pack))
            raw = g.path(pack).read_bytes()
            entries = parse_trailer(v.keyring, names.pack_id_of(pack), raw[off:off + t])
            assert len(entries) == count and entries[0].offset == 0
            assert entries[-1].offset + entries[-1].length == off
    finally:
        await v.close()


async def test_golden_vault_layout_is_format_v2(tmp_path: Path) -> None:
    """Pins format 2: chunked maps (vault/mapchunks.py), manifests and config of format 2;
    everything else as format 1 (regenerate golden2 only on a deliberate change)."""
    g = await copy_golden(tmp_path, GOLDEN2)
    await _pins_chunked_maps(g)
    for pack, count in ((g.full_pack, 5), (g.delta_pack, 2)):  # a block a sealed unit
        raw = g.path(pack).read_bytes()
        assert raw[:2] == bytes([1, 2])
        assert len(await _listed(g, pack)) == count


async def test_golden_vault_layout_is_format_v3(tmp_path: Path) -> None:
    """Pins format 3: format 2's chunked maps, and packs of frames (vault/pack.py);
    manifests and config of format 3 (regenerate golden3 only on a deliberate change)."""
    g = await copy_golden(tmp_path, GOLDEN3)
    await _pins_chunked_maps(g)
    # Packs of frames: a pack's blocks sealed together (type 10), each block's entry the
    # frame's place (the full pack: one frame of five blocks; the delta's: two blocks).
    for pack, count in ((g.full_pack, 5), (g.delta_pack, 2)):
        raw = g.path(pack).read_bytes()
        assert raw[:2] == bytes([1, 10])
        off, _t = _trailer_range(g.path(pack))
        listed = await _listed(g, pack)
        assert len(listed) == count and {(e.offset, e.length) for e in listed} == {(0, off)}


async def _listed(g: Golden, pack: str) -> list[PackEntry]:
    """The entries of ``pack``'s trailer."""
    raw = g.path(pack).read_bytes()
    off, t = _trailer_range(g.path(pack))
    v = await open_vault(g.vault, g.key)
    try:
        return parse_trailer(v.keyring, names.pack_id_of(pack), raw[off:off + t])
    finally:
        await v.close()


async def _pins_chunked_maps(g: Golden) -> None:
    """The objects of a golden vault of format 2 or 3, its maps in chunks of two entries,
    its config and manifests of its format."""
    objs = sorted(p.relative_to(g.vault).as_posix() for p in g.vault.rglob("*") if p.is_file())
    kinds = [o.split("/")[0] for o in objs]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "config": 1, "keys": 1, "index": 2, "maps": 2, "packs": 2, "points": 2}
    for name, otype in ((names.CONFIG, 1), (names.POINTS + g.p1, 5),
                        *((n, 4) for n in g.index_of.values())):
        assert g.path(name).read_bytes()[:4] == bytes([1, otype, 0, 0]), name
    for attr, entries in (("full_map", 5), ("delta_map", 4)):
        path, start, t = _chunks(g, attr)
        raw = path.read_bytes()
        nchunks = -(-entries // 2)  # the golden vaults' chunks hold two entries
        chunk = 32 + 2 * 40  # a sealed chunk of two entries
        assert raw[:4] == bytes([1, 9, 0, 0])  # chunk 0: type 9, never compressed
        assert raw[start:start + 4] == bytes([1, 6, 0, 0])  # the table: type 6
        assert t == 32 + 25 + 32 * nchunks  # header of 25 bytes, 32 a chunk
        assert start == (nchunks - 1) * chunk + 32 + 40 * (entries - 2 * (nchunks - 1))
    v = await open_vault(g.vault, g.key)
    try:
        assert v.config.format == g.fmt and v.config.block_size == BS
        p1, p2 = await v.list_points()
        assert (p1.id, p2.id, p1.format, p2.format) == (g.p1, g.p2, g.fmt, g.fmt)
        assert (p2.base, p2.chain) == (g.p1, 1)
        full = await v.read_map(p1.disks[0].map, g.fmt)
        delta = await v.read_map(p2.disks[0].map, g.fmt)
        assert full.kind == FULL and sorted(full.blocks) == [0, 1, 3, 4, 5]
        assert sorted(delta.blocks) == [1, 2, 3, 5] and delta.blocks[3] == bytes(32)
        assert delta.blocks[2] == full.blocks[0]  # deduplicated
    finally:
        await v.close()


@pytest.mark.parametrize("src", VAULTS)
async def test_golden_vault_restores_exactly_and_checks_clean(tmp_path: Path, src: Path
                                                              ) -> None:
    g = await copy_golden(tmp_path, src)
    for pid in (g.p1, g.p2):
        out = tmp_path / f"out-{pid[:8]}"
        code, text = restore(g, pid[:12], out)
        assert code == 0, text
        assert sha256(out / f"{DISK}.img") == _want(pid)
        assert _leftovers(out) == [f"{DISK}.img"]
    code, text = check(g, "--read-data")
    assert code == 0, text
    assert "checked 2 packs, 7 blocks, 2 points (2 disk digests verified): no problems" in text
    code, text = check(g, "--json")
    assert code == 0, text
    doc = json.loads(text.splitlines()[0])
    assert doc["ok"] and doc["problems"] == [] and doc["exit_code"] == 0
    assert doc["counts"]["points"] == 2 and doc["counts"]["maps"] == 2
    code, text = check(g, "--read-data", "--subset", "50%", "--json")
    assert code == 0, text
    counts = json.loads(text.splitlines()[0])["counts"]
    assert counts["packs_read"] == 1
    assert counts["digests_verified"] + counts["digests_skipped"] == 2
    assert not any(g.vault.rglob("*.tmp")), "check or restore wrote to the vault"


# -- corruptions -------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    damage: Callable[[Golden, Path], Path | None]  # returns a key file to use instead
    restore: tuple[int, int]  # exit codes of restoring point 1 and point 2 (0: invisible)
    check: int
    named: Callable[[Golden], str]  # the object check must name
    #: the golden vaults it applies to: format 2's packs are format 1's and its maps
    #: format 3's, so 1 and 3 cover every object a pack or map case damages
    formats: tuple[int, ...] = (1, 3)
    restore3: tuple[int, int] | None = None  # format 3's exit codes, where they differ


def _flip_block(which: str) -> Callable[[Golden, Path], None]:
    def damage(g: Golden, _tmp: Path) -> None:
        off, ln = getattr(g, which)
        _flip(g.path(g.full_pack), off + ln // 2)
    return damage


def _flip_trailer(g: Golden, _tmp: Path) -> None:
    off, t = _trailer_range(g.path(g.full_pack))
    _flip(g.path(g.full_pack), off + t // 2)


def _flip_tail(g: Golden, _tmp: Path) -> None:
    _flip(g.path(g.delta_pack), os.path.getsize(g.path(g.delta_pack)) - TAIL.size, 0x01)


def _flip_middle(attr: str) -> Callable[[Golden, Path], None]:
    def damage(g: Golden, _tmp: Path) -> None:
        name = _object(attr)(g)
        _flip(g.path(name), os.path.getsize(g.path(name)) // 2)
    return damage


def _object(attr: str) -> Callable[[Golden], str]:
    def name(g: Golden) -> str:
        if attr == "full_index":
            return g.index_of[g.full_pack]
        if attr in ("p1", "p2"):
            return names.POINTS + (g.p1 if attr == "p1" else g.p2)
        if attr == "config":
            return names.CONFIG
        return str(getattr(g, attr))
    return name


def _flip_slot_key(g: Golden, _tmp: Path) -> None:
    # Flip one bit of the wrapped master key (the slot's only authenticated field; the
    # rest of the slot JSON is plaintext that can only make the slot fail to open).
    slot = json.loads(g.path(g.slot).read_bytes())
    wrapped = bytearray(base64.b64decode(slot["wrapped"]))
    wrapped[10] ^= 0x01
    slot["wrapped"] = base64.b64encode(bytes(wrapped)).decode()
    g.path(g.slot).write_text(json.dumps(slot, sort_keys=True))


def _flip_slot_json(g: Golden, _tmp: Path) -> None:
    _flip(g.path(g.slot), 0, 0x01)  # "{" -> "z": not JSON any more


def _truncate(g: Golden, _tmp: Path) -> None:
    with open(g.path(g.full_pack), "r+b") as f:
        f.truncate(os.path.getsize(g.path(g.full_pack)) // 2)


def _swap_packs(g: Golden, _tmp: Path) -> None:
    shutil.copy(g.path(g.delta_pack), g.path(g.full_pack))  # valid pack, wrong name


def _copy_manifest(g: Golden, _tmp: Path) -> None:
    shutil.copy(g.path(names.POINTS + g.p1), g.path(names.POINTS + g.p2))


def _chunks(g: Golden, attr: str) -> tuple[Path, int, int]:
    """A format 2 map of the golden vault: its file, where its table starts, its length."""
    path = g.path(_object(attr)(g))
    raw = path.read_bytes()
    t, magic = TAIL.unpack(raw[-TAIL.size:])
    assert magic == b"SRMC"
    return path, len(raw) - TAIL.size - t, t


def _flip_map_table(g: Golden, _tmp: Path) -> None:
    path, start, t = _chunks(g, "full_map")
    _flip(path, start + t // 2)


def _flip_map_tail(g: Golden, _tmp: Path) -> None:
    path, _start, _t = _chunks(g, "delta_map")
    _flip(path, os.path.getsize(path) - 1, 0x01)  # the magic


def _swap_map_chunks(g: Golden, _tmp: Path) -> None:
    # Chunks 0 and 1 of the full map hold two entries each: the same length, so the
    # table's offsets still fit; each is sealed at its own place (its index in the AD).
    path, _start, _t = _chunks(g, "full_map")
    raw = bytearray(path.read_bytes())
    n = 2 * 40 + 32
    raw[0:n], raw[n:2 * n] = raw[n:2 * n], raw[0:n]
    path.write_bytes(bytes(raw))


def _truncate_map(g: Golden, _tmp: Path) -> None:
    path, _start, _t = _chunks(g, "delta_map")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _wrong_key(_g: Golden, tmp: Path) -> Path:
    other = tmp / "other.key"
    new_keyfile(other)
    return other


def _delete(attr: str) -> Callable[[Golden, Path], None]:
    def damage(g: Golden, _tmp: Path) -> None:
        g.path(_object(attr)(g)).unlink()
    return damage


CASES: dict[str, Case] = {
    # Block 0 is used by both points (unchanged at point 2).
    "pack-block-shared": Case(_flip_block("shared_block"), (3, 3), 3, _object("full_pack")),
    # Block 3 of point 1 is zero at point 2: restoring point 2 never reads it, so only
    # point 1's restore (and check) can see the damage.
    "pack-block-p1-only": Case(_flip_block("p1_only_block"), (3, 0), 3, _object("full_pack"),
                               # In format 3 it shares its frame with blocks point 2 needs.
                               restore3=(3, 3)),
    # A restore reads blocks at the offsets the index gives and never reads pack
    # trailers or tails (they exist to rebuild the index): invisible to restore.
    "pack-trailer": Case(_flip_trailer, (0, 0), 3, _object("full_pack")),
    "pack-tail": Case(_flip_tail, (0, 0), 3, _object("delta_pack")),
    # Restore loads every index object and every manifest, whichever point it restores.
    "index": Case(_flip_middle("full_index"), (3, 3), 3, _object("full_index")),
    "map-full": Case(_flip_middle("full_map"), (3, 3), 3, _object("full_map")),
    # Point 1 does not read point 2's delta map.
    "map-delta": Case(_flip_middle("delta_map"), (0, 3), 3, _object("delta_map")),
    "point-manifest": Case(_flip_middle("p1"), (3, 3), 3, _object("p1")),
    "config": Case(_flip_middle("config"), (3, 3), 3, _object("config")),
    # The vault's only slot no longer opens: indistinguishable from a wrong key (exit 4).
    "key-slot-wrapped-key": Case(_flip_slot_key, (4, 4), 4, _object("slot")),
    "key-slot-json": Case(_flip_slot_json, (4, 4), 4, _object("slot")),
    "pack-truncated": Case(_truncate, (3, 3), 3, _object("full_pack")),
    "pack-swapped": Case(_swap_packs, (3, 3), 3, _object("full_pack")),
    # Point 1 is intact and asked for by its id: a restore sets aside a damaged manifest
    # that cannot be the point asked for (a 'latest' spec would refuse).
    "manifest-copied-over-another": Case(_copy_manifest, (0, 3), 3, _object("p2")),
    "wrong-key-file": Case(_wrong_key, (4, 4), 4, _object("slot")),
    "pack-missing": Case(_delete("full_pack"), (3, 3), 3, _object("full_pack")),
    "map-missing": Case(_delete("delta_map"), (0, 3), 3, _object("delta_map")),
    # Chunked maps (formats 2 and 3): the chunk table, the tail that finds it, chunks
    # moved, a map cut.
    "map-table": Case(_flip_map_table, (3, 3), 3, _object("full_map"), (2, 3)),
    "map-tail": Case(_flip_map_tail, (0, 3), 3, _object("delta_map"), (2, 3)),
    "map-chunks-swapped": Case(_swap_map_chunks, (3, 3), 3, _object("full_map"), (2, 3)),
    "map-truncated": Case(_truncate_map, (0, 3), 3, _object("delta_map"), (2, 3)),
}


_KNOWN: dict[str, pytest.MarkDecorator] = {}


@pytest.mark.parametrize(("src", "case"), [
    pytest.param(src, c, id=f"format{fmt}-{c}", marks=[_KNOWN[c]] if c in _KNOWN else [])
    for src, fmt in FORMAT_OF.items() for c in CASES if fmt in CASES[c].formats])
async def test_corruption_is_caught_by_restore_and_check(tmp_path: Path, case: str, src: Path
                                                         ) -> None:
    c = CASES[case]
    g = await copy_golden(tmp_path, src)
    key = c.damage(g, tmp_path)
    outs = [tmp_path / "out1", tmp_path / "out2"]
    with ThreadPoolExecutor(3) as ex:
        restores = [ex.submit(restore, g, pid, out, key) for pid, out in zip((g.p1, g.p2), outs,
                                                                              strict=True)]
        checked = ex.submit(check, g, "--read-data", key=key)
        results = [f.result() for f in restores]
        code, text = checked.result()
    wanted = c.restore3 if g.fmt == 3 and c.restore3 is not None else c.restore
    for (got, out_text), want, out, pid in zip(results, wanted, outs, (g.p1, g.p2), strict=True):
        assert got == want, f"restore {pid[:8]}: {out_text}"
        if want:
            assert _leftovers(out) == [], f"restore {pid[:8]} left {_leftovers(out)}"
            assert "error:" in out_text
        else:  # legitimately invisible to this point's restore: and the data is right
            assert sha256(out / f"{DISK}.img") == _want(pid)
    assert code == c.check, text
    named = c.named(g)
    assert f"ERROR: {named}: " in text, f"{named} not named:\n{text}"
    assert re.search(r"^(checked .*: \d+ problems?|the key given opens none of)", text, re.M), text


# -- rebuild-index -----------------------------------------------------------------------

@pytest.mark.parametrize("src", VAULTS)
async def test_rebuild_index_from_packs_alone(tmp_path: Path, src: Path) -> None:
    g = await copy_golden(tmp_path, src)
    shutil.rmtree(g.vault / "index")
    code, text = check(g)
    assert code == 3, text  # points need blocks in no index; the packs are unindexed
    assert f"WARNING: {g.full_pack}: unindexed" in text and "rebuild-index" in text
    code, text = restore(g, g.p2, tmp_path / "before")
    assert code == 3, text
    r = run_cli("rebuild-index", "--vault", g.url, "--key-file", str(g.key))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "indexed 2 packs (7 blocks) in 1 new index object; deleted 0 old index objects" \
        in r.stdout
    assert len(list((g.vault / "index").iterdir())) == 1
    assert not any(p.is_file() for p in (g.vault / "locks").rglob("*"))  # lock released
    restores_and_checks_clean(g, tmp_path / "out")
    code, text = check(g)
    assert "WARNING" not in text

