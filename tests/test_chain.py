"""vault/chain.py: walking delta chains, a broken chain (missing base, loop), and rebase
keeping every retained point restoring byte for byte."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.digest import digest_of_fingerprint_map, fingerprint
from tests.helpers import restore_all
from vault import names
from vault.chain import BrokenChainError, chain_of, crosses, rebase
from vault.keyslots import KeyMaterial
from vault.maps import FULL, ZERO_ID, BlockMap, MapBuilder, encode_map
from vault.point import Point
from vault.prune import prune
from vault.repo import MAX_CHAIN, Vault
from vault.retention import Retention
from vault.store.memory import MemoryStore
from vault.writer import CycleWriter, DiskSpec

BS = 64 * 1024
NBLOCKS = 24


async def _chain(n: int, range_blocks: int = 1 << 16, changes_limit: int = 1 << 20
                 ) -> tuple[Vault, list[Point], dict[str, str]]:
    """A vault with one full point and ``n - 1`` deltas on it, each changing (and zeroing)
    a few blocks (a full map again after ``MAX_CHAIN`` deltas, merged from the base's in
    ranges of ``range_blocks``); returns the points oldest first and each point's disk
    sha256."""
    v = await Vault.create(MemoryStore(), KeyMaterial(keyfile=bytes(32)))
    rng = random.Random(11)
    disk = bytearray(rng.randbytes(NBLOCKS * BS))
    points: list[Point] = []
    expected: dict[str, str] = {}
    with ThreadPoolExecutor(2) as ex:
        index = await v.load_index()
        for i in range(n):
            changed = list(range(NBLOCKS)) if i == 0 else rng.sample(range(NBLOCKS), 5)
            zeroed = changed[:1] if i else []
            for b in changed:
                disk[b * BS:(b + 1) * BS] = bytes(BS) if b in zeroed else rng.randbytes(BS)
            w = CycleWriter(v, index, ex, machine="m1", cycle=f"c{i}",
                            disks=[DiskSpec("sda", len(disk), BS)], full=i == 0,
                            base=points[-1] if points else None, range_blocks=range_blocks,
                            changes_limit=changes_limit)
            await w.add([(0, b, bytes(disk[b * BS:(b + 1) * BS])) for b in changed])
            if changes_limit < len(changed):
                assert w.changes[0].runs > 0
            fps = b"".join(fingerprint(bytes(disk[b * BS:(b + 1) * BS]))
                           for b in range(NBLOCKS))
            p = await w.finish({"sda": digest_of_fingerprint_map(fps)}, "crash")
            points.append(p)
            expected[p.id] = hashlib.sha256(disk).hexdigest()
    return v, points, expected


async def _objects(v: Vault) -> dict[str, bytes]:
    return {b.name: await v.store.get(b.name) async for b in v.store.list()}


async def test_chain_of_walks_to_the_full_point() -> None:
    v, pts, _ = await _chain(4)
    known: dict[str, Point] = {}
    chain = await chain_of(v, pts[3], known)
    assert [p.id for p in chain] == [p.id for p in reversed(pts)]
    assert chain[-1].base is None
    assert set(known) == {p.id for p in pts[:3]}  # the bases read are remembered
    assert crosses(chain, {pts[1].id}) and not crosses(chain, {pts[3].id})
    assert [p.id for p in await chain_of(v, pts[0])] == [pts[0].id]


async def test_missing_base_is_a_broken_chain_and_rebase_writes_nothing() -> None:
    v, pts, _ = await _chain(4)
    await v.store.delete(names.POINTS + pts[1].id)
    with pytest.raises(BrokenChainError) as e:
        await chain_of(v, pts[3])
    assert e.value.point_id == pts[3].id
    assert e.value.object_name == names.POINTS + pts[1].id
    assert f"points/{pts[2].id} is a delta on it" in str(e.value)
    before = await _objects(v)
    with pytest.raises(BrokenChainError):
        await rebase(v, pts[3])
    assert await _objects(v) == before
    # the rest of the chain is whole
    assert [p.id for p in await chain_of(v, pts[0])] == [pts[0].id]


async def test_a_loop_is_a_broken_chain() -> None:
    v, pts, _ = await _chain(2)
    looped = dataclasses.replace(pts[1], base=pts[1].id)  # its own base
    await v.put_point(looped)
    with pytest.raises(BrokenChainError, match=f"longer than {MAX_CHAIN + 1}"):
        await chain_of(v, looped)


async def test_rebase_keeps_every_retained_point_exact(tmp_path: Path) -> None:
    v, pts, expected = await _chain(6)
    forget = {pts[1].id, pts[2].id}
    kept = [p for p in pts if p.id not in forget]
    known = {p.id: p for p in pts}
    resolved = await v.resolve_map(pts[3], "sda")
    rebased = []
    for p in kept:  # oldest first, as prune and retention go
        if crosses(await chain_of(v, p, known), forget):
            known[p.id] = await rebase(v, p, known)
            rebased.append(p.id)
    assert rebased == [pts[3].id]  # the later points now build on the rebased one
    new = await v.read_point(pts[3].id)
    assert (new.base, new.chain, new.disks[0].map_kind) == (None, 0, "full")
    full = await v.read_map(new.disks[0].map)  # merged from its chain a range at a time
    assert (full.kind, full.size, full.block_size, full.blocks) == (
        FULL, resolved.size, resolved.block_size, resolved.blocks)
    assert new.disks[0].digest == pts[3].disks[0].digest
    for pid in forget:
        await v.store.delete(names.POINTS + pid)
    for p in kept:
        current = await v.read_point(p.id)
        assert await restore_all(v, current, tmp_path / "out") == {"sda": expected[p.id]}


async def test_prune_stops_before_changing_a_vault_with_a_broken_chain() -> None:
    v, pts, _ = await _chain(4)
    await v.store.delete(names.POINTS + pts[1].id)
    before = await _objects(v)
    with ThreadPoolExecutor(2) as ex, pytest.raises(BrokenChainError):
        await prune(v, Retention(keep_all_hours=0, hourly_hours=0, two_hourly_hours=0,
                                 retention_hours=0), ex)
    assert await _objects(v) == before


def test_a_map_built_entry_by_entry_is_the_encoded_map() -> None:
    rng = random.Random(7)
    blocks = {n: rng.randbytes(32) for n in sorted(rng.sample(range(10_000), 500))}
    b = MapBuilder(FULL, 10_000 * 4096, 4096)
    items = sorted(blocks.items())
    b.extend(items[:200])
    b.extend(items[200:])
    assert b.plaintext() == encode_map(BlockMap(FULL, 10_000 * 4096, 4096, blocks))
    with pytest.raises(ValueError, match="increasing block order"):
        b.extend([items[0]])


@pytest.mark.parametrize("span", [1 << 16, 5, 1], ids=["one-range", "ranges-of-5", "per-block"])
async def test_a_chain_starts_again_with_a_full_map_merged_from_its_base(
        tmp_path: Path, span: int) -> None:
    v, pts, expected = await _chain(MAX_CHAIN + 3, range_blocks=span)
    assert [p.chain for p in pts] == [*range(MAX_CHAIN + 1), 0, 1]
    full = pts[MAX_CHAIN + 1]
    assert (full.base, full.disks[0].map_kind) == (None, "full")
    before = await v.resolve_map(pts[MAX_CHAIN], "sda")
    changed = await v.read_map(full.disks[0].map)
    # the base's blocks with this cycle's 5 changes (one of them zeroed) applied
    assert len(set(before.blocks.items()) ^ set(changed.blocks.items())) <= 10
    for p in pts[MAX_CHAIN:]:
        assert await restore_all(v, p, tmp_path / "out") == {"sda": expected[p.id]}


async def test_changes_spilled_to_runs_make_the_same_maps(tmp_path: Path) -> None:
    # Each cycle's changes past 2 blocks go to run files (in the random order the deltas
    # change their blocks, so the runs overlap and are merged): the same maps, every
    # point restoring byte for byte, the merged full map included.
    v1, pts1, expected = await _chain(MAX_CHAIN + 3)
    v2, pts2, expected2 = await _chain(MAX_CHAIN + 3, changes_limit=2)
    # The same disks, point by point (a point's id is named with its vault's key).
    assert [expected2[p.id] for p in pts2] == [expected[p.id] for p in pts1]
    for p1, p2 in zip(pts1, pts2, strict=True):
        assert p2.disks[0].map_kind == p1.disks[0].map_kind
        m1 = (await v1.read_map(p1.disks[0].map)).blocks
        m2 = (await v2.read_map(p2.disks[0].map)).blocks  # ids are keyed: each vault's own
        assert {n: b == ZERO_ID for n, b in m2.items()} == {n: b == ZERO_ID
                                                            for n, b in m1.items()}
    for p in pts2:
        assert await restore_all(v2, p, tmp_path / "out") == {"sda": expected2[p.id]}
