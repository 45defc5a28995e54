"""The verification of recovery points in ranges and within a memory budget (#16): a disk
is gone through a range of blocks at a time along its chain of maps, the points resting
on one full map together; past the budget the index is a table on local disk and the
fingerprints kept between ranges are bounded. What it finds does not depend on any of
that, and is what ``check --read-data`` finds about the same points.

The vault: two machines with a chain of ten points each (tests/test_memory_streaming.py),
clean and with every kind of damage; and a sparse disk of 2^18 blocks at the end of a
delta chain (tests/chainplan.py), whose verification in ranges holds a fraction of what
the resolved map and a fingerprint per block held."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.digest import digest_of_fingerprint_map, fingerprint
from configserver.verification import PointResult, verify_points
from tests.chainplan import chain_plan, write_cycle
from tests.helpers import make_vault, open_vault
from tests.test_memory_streaming import _build, _copy, _damage, _open
from vault import names
from vault.check import check_vault
from vault.keyslots import KeyMaterial, read_keyfile
from vault.mapranges import RANGE_BLOCKS
from vault.point import Point
from vault.repo import Vault
from vault.store.local import LocalStore
from vault.store.protocol import BlobStore
from vault.store.wrapper import StoreWrapper

# memory (bytes, None: in memory) and range size: the whole disk at once, a block at a
# time, ranges that do not divide it; within no budget (every fingerprint let go after
# its range) and within a small one
MODES = ((None, RANGE_BLOCKS), (None, 7), (0, 1), (0, 7), (64 << 10, 64))


class _Counting(StoreWrapper):
    """Counts the bytes of packs read."""

    def __init__(self, inner: BlobStore) -> None:
        super().__init__(inner)
        self.pack_bytes = 0
        self.url = "counting"

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = await self.inner.get(name, offset, length)
        if name.startswith(names.PACKS):
            self.pack_bytes += len(data)
        return data


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify-stream")
    asyncio.run(_build(root))
    return root


async def _verify(vault: Vault, memory: int | None, span: int, temp_dir: Path,
                  points: list[Point] | None = None, index_dir: Path | None = None
                  ) -> list[PointResult]:
    seen: list[tuple[int, int]] = []
    with ThreadPoolExecutor(2) as ex:
        results = await verify_points(
            vault, points if points is not None else await vault.list_points(), ex,
            clock=lambda: 7.0, progress=lambda d, t: seen.append((d, t)), memory=memory,
            index_dir=index_dir, temp_dir=temp_dir, range_blocks=span)
    assert seen and seen[-1][0] == seen[-1][1] > 0  # the progress reaches its total
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    assert all(r.verified == 7.0 for r in results)
    return results


def _doc(results: list[PointResult]) -> list[dict[str, object]]:
    return [r.to_json() for r in results]


async def test_ranges_and_budgets_find_what_check_finds(built: Path, tmp_path: Path) -> None:
    for damaged in (False, True):
        r = _copy(built, tmp_path / f"damaged-{damaged}")
        if damaged:
            await _damage(r)
        vault = await _open(r)
        try:
            docs = [_doc(await _verify(vault, memory, span, tmp_path))
                    for memory, span in MODES]
        finally:
            await vault.close()
        assert all(d == docs[0] for d in docs[1:])
        assert len(docs[0]) == 20
        assert [p for p in tmp_path.iterdir() if p.name.startswith("siterecovery-")] == []
        failed = {str(d["point"]) for d in docs[0] if not d["ok"]}
        with ThreadPoolExecutor(2) as ex:
            report = await check_vault(LocalStore(r / "vault"),
                                       KeyMaterial(keyfile=read_keyfile(r / "vault.key")),
                                       read_data=True, executor=ex)
        flagged = {p.object[len(names.POINTS):] for p in report.problems
                   if p.object.startswith(names.POINTS)
                   and p.kind in ("unrestorable", "mismatch")}
        assert failed == flagged
        if not damaged:
            assert all(d["disks_verified"] == 1 for d in docs[0])
            continue
        assert failed  # (how many points the damage breaks depends on the random pack ids)
        # each point's damage names the object check names as the cause for that point
        by_point = {str(d["point"]): {str(o["object"]) for o in d["damaged"]}  # type: ignore[attr-defined]
                    for d in docs[0]}
        for p in report.problems:
            if not p.object.startswith(names.POINTS) or p.kind not in ("unrestorable",
                                                                         "mismatch"):
                continue
            named = re.search(r"(packs/[0-9a-f]{2}/[0-9a-f]{64}|maps/[0-9a-f]{64})", p.reason)
            cause = (named.group(1) if named else "index" if "in no index" in p.reason
                     else p.object)
            assert cause in by_point[p.object[len(names.POINTS):]], (p, by_point)


async def test_each_block_is_read_once_within_memory(built: Path, tmp_path: Path) -> None:
    """In memory a block shared by points (and by ranges, one at a time) is read once: the
    bytes of packs read are those of the distinct blocks the points need; within no budget
    a range's blocks are read once for all the points resting on its full map."""
    r = _copy(built, tmp_path / "v")
    vault = await _open(r)
    try:
        points = await vault.list_points()
        index = await vault.load_index()
        needed: set[bytes] = set()
        for p in points:
            needed.update((await vault.resolve_map(p, "d0")).blocks.values())
        needed.discard(bytes(32))
        # each place read once: in format 3 the blocks of a frame share its place
        locs = [index.get(b) for b in needed]
        want = sum(length for _pack, _offset, length in {
            (loc.pack_id, loc.offset, loc.length) for loc in locs if loc is not None})
        index.close()
        assert want > 0
        got = {}
        for memory, span in ((None, RANGE_BLOCKS), (None, 7), (0, RANGE_BLOCKS), (0, 7)):
            vault.store = counting = _Counting(LocalStore(r / "vault"))
            results = await _verify(vault, memory, span, tmp_path, points)
            assert all(x.ok for x in results)
            got[(memory, span)] = counting.pack_bytes
    finally:
        await vault.close()
    # each machine's points rest on one full map: with one range per disk, or with the
    # fingerprints kept, every block is read once
    assert got[(None, RANGE_BLOCKS)] == got[(None, 7)] == got[(0, RANGE_BLOCKS)] == want, (
        got, want)
    assert got[(0, 7)] == want  # ranges go forward: nothing a later range needs was read


BS = 4096
NBLOCKS = 1 << 18  # 1 GiB of 4 KiB blocks, sparse
SPAN = 1 << 12
#: blocks a frame of the sparse disk's packs: a reader holds one frame a read in flight,
#: bounded whatever the disk (1 MiB in a real vault); kept small here so that the bound
#: below measures what grows with the disk
FRAME_BLOCKS = 4


def _content(n: int, cycle: int) -> bytes:
    return n.to_bytes(8, "little") + (cycle + 1).to_bytes(8, "little") + bytes(BS - 16)


async def test_a_large_sparse_disk_is_verified_in_ranges(tmp_path: Path) -> None:
    url, key = await make_vault(tmp_path)
    vault = await open_vault(tmp_path / "vault", key)
    vault.frame_target = FRAME_BLOCKS * BS  # what a read holds past the maps: small
    try:
        zero_fp = fingerprint(bytes(BS))
        fps = bytearray(zero_fp * NBLOCKS)
        base: Point | None = None
        with ThreadPoolExecutor(2) as ex:
            for c, changes in enumerate(chain_plan(random.Random(18), NBLOCKS, 8000, 2000)):
                for n, data in changes.items():
                    fps[16 * n:16 * n + 16] = fingerprint(_content(n, c)) if data else zero_fp
                base = await write_cycle(vault, ex, c, changes, _content, NBLOCKS, BS, base,
                                         digest_of_fingerprint_map(fps))
        assert base is not None and base.chain == 2
        tracemalloc.start()
        try:  # what the verification held before: the resolved map, a fingerprint a block
            index = await vault.load_index()
            resolved = await vault.resolve_map(base, "sda")
            kept = {b: fingerprint(b) for b in resolved.blocks.values()}
            as_dicts = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        index.close()
        del resolved, kept
        # the index on disk, built by a first run and kept for the next, as the job does
        idx = tmp_path / "verify-index"
        assert [x.ok for x in await _verify(vault, 0, SPAN, tmp_path, [base], idx)] == [True]
        assert [p.name for p in idx.iterdir() if p.name.endswith(".index.sqlite")]
        tracemalloc.start()
        try:
            results = await _verify(vault, 256 << 10, SPAN, tmp_path, [base], idx)
            in_ranges = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [x.ok for x in results] == [True]
        # the point's own digest is checked: a block off in any range would fail it
        assert in_ranges < as_dicts / 3, (in_ranges, as_dicts)
    finally:
        await vault.close()
    assert url
