"""Vault format 2 (vault/mapchunks.py): maps in chunks read the same as whole maps by
every reader, whatever the chunk size; a reader holds a chunk or two, not the map; a
format 1 vault is written and read as format 1 until ``vault migrate``."""

from __future__ import annotations

import hashlib
import random
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.digest import digest_of_fingerprint_map, fingerprint
from tests.helpers import restore_all
from vault import names
from vault.check import check_vault
from vault.errors import IntegrityError
from vault.fpstream import fingerprint_ranges
from vault.keyslots import KeyMaterial
from vault.mapchain import MapChain, chain_entries
from vault.mapchunks import MAGIC, TAIL, open_chunked, seal_chunked
from vault.mapranges import ChainRanges
from vault.maps import ENTRY, FULL, BlockMap, MapView, encode_map, open_map_entries
from vault.point import Point
from vault.prune import prune
from vault.repo import MAX_CHAIN, Vault
from vault.retention import Retention
from vault.store.local import LocalStore
from vault.writer import CycleWriter, DiskSpec

BS = 64 * 1024
NBLOCKS = 40
KEY = bytes(range(32))


async def _history(root: Path, fmt: int, chunk_entries: int, n: int
                   ) -> tuple[Vault, list[Point], dict[str, bytes]]:
    """A vault of format ``fmt`` (maps in chunks of ``chunk_entries``) with a full point
    and ``n - 1`` deltas (some blocks zeroed, a full map again past ``MAX_CHAIN``), the
    same data whatever the format; each point's disk image."""
    v = await Vault.create(LocalStore(root), KeyMaterial(keyfile=KEY), fmt=fmt)
    v.map_chunk_entries = chunk_entries
    rng = random.Random(2026)
    disk = bytearray(NBLOCKS * BS)
    for b in rng.sample(range(NBLOCKS), NBLOCKS * 3 // 4):  # a quarter of the disk zero
        disk[b * BS:(b + 1) * BS] = rng.randbytes(BS)
    points: list[Point] = []
    images: dict[str, bytes] = {}
    with ThreadPoolExecutor(2) as ex:
        index = await v.load_index()
        for i in range(n):
            changed = list(range(NBLOCKS)) if i == 0 else rng.sample(range(NBLOCKS), 6)
            for b in changed[1:] if i else []:
                disk[b * BS:(b + 1) * BS] = rng.randbytes(BS)
            if i:
                disk[changed[0] * BS:(changed[0] + 1) * BS] = bytes(BS)
            w = CycleWriter(v, index, ex, machine="m1", cycle=f"c{i}",
                            disks=[DiskSpec("sda", len(disk), BS)], full=i == 0,
                            base=points[-1] if points else None, range_blocks=7)
            blocks = [bytes(disk[b * BS:(b + 1) * BS]) for b in range(NBLOCKS)]
            await w.add([(0, b, blocks[b] if any(blocks[b]) else None) for b in changed])
            digest = digest_of_fingerprint_map(b"".join(fingerprint(b) for b in blocks))
            points.append(await w.finish({"sda": digest}, "crash"))
            images[points[-1].id] = bytes(disk)
    return v, points, images


@pytest.mark.parametrize(("fmt", "chunk"), [(1, 0), (2, 1), (2, 3), (2, 1 << 16)],
                         ids=["format1", "chunks-of-1", "chunks-of-3", "chunks-of-65536"])
async def test_every_reader_reads_chunked_maps_as_whole_ones(tmp_path: Path, fmt: int,
                                                             chunk: int) -> None:
    v, pts, images = await _history(tmp_path / "vault", fmt, chunk or 1, MAX_CHAIN + 3)
    try:
        assert {p.format for p in pts} == {fmt} and v.config.format == fmt
        raw = await v.store.get(names.MAPS + pts[0].disks[0].map)
        assert (raw[-4:] == MAGIC) == (fmt == 2)
        index = await v.load_index()
        rng = random.Random(5)
        for p in pts:
            want = images[p.id]
            resolved = (await v.resolve_map(p, "sda")).blocks
            assert sorted(resolved) == [b for b in range(NBLOCKS)
                                        if any(want[b * BS:(b + 1) * BS])]
            for span in (1, 7, 1 << 16):  # ranges across chunk ends and within one
                got: dict[int, bytes] = {}
                ranges = ChainRanges(await chain_entries(v, p, "sda"), NBLOCKS)
                async for _first, _end, blocks in ranges.walk(span):
                    got.update(blocks)
                assert got == resolved, span
            skipped = ChainRanges(await chain_entries(v, p, "sda"), NBLOCKS)
            await skipped.skip(17)
            await skipped.load(NBLOCKS)
            assert skipped.blocks(17, NBLOCKS) == {n: b for n, b in resolved.items() if n >= 17}
            asked = rng.sample(range(NBLOCKS), 12)
            assert await MapChain(await chain_entries(v, p, "sda")).lookup(asked) == {
                n: resolved[n] for n in asked if n in resolved}
            fps = b"".join([f async for _first, f in fingerprint_ranges(
                v, p, "sda", index=index, span=5)])
            assert fps == b"".join(fingerprint(want[b * BS:(b + 1) * BS])
                                   for b in range(NBLOCKS))
        for p in (pts[0], pts[MAX_CHAIN], pts[-1]):
            got_sha = await restore_all(v, p, tmp_path / "out")
            assert got_sha == {"sda": hashlib.sha256(images[p.id]).hexdigest()}
        report = await check_vault(v.store, KeyMaterial(keyfile=KEY), read_data=True,
                                   range_blocks=3)
        assert report.errors == [] and report.counts["digests_verified"] == len(pts)
        # A prune that cuts chains rebases the points kept on them: written at the
        # vault's format, and restoring byte for byte.
        with ThreadPoolExecutor(2) as ex:
            await prune(v, Retention(keep_all_hours=0, hourly_hours=0, two_hourly_hours=0,
                                     retention_hours=0), ex, range_blocks=5)
        for p in await v.list_points():
            assert p.format == fmt
            assert await restore_all(v, p, tmp_path / "out") == {
                "sda": hashlib.sha256(images[p.id]).hexdigest()}
    finally:
        await v.close()


async def test_a_range_reader_holds_a_chunk_or_two_not_the_map(tmp_path: Path) -> None:
    """Going through a map of 300 000 entries (12 MB of plaintext) a range of 8192
    blocks at a time: a format 1 map is held whole (its plaintext), a format 2 map in
    chunks of 8192 entries (330 kB) a chunk or two at a time (and its last two read)."""
    v = await Vault.create(LocalStore(tmp_path / "vault"), KeyMaterial(keyfile=KEY))
    v.map_chunk_entries = 8192
    count, nblocks = 300_000, 600_000
    rng = random.Random(3)
    m = BlockMap(FULL, nblocks * BS, BS,
                 {n: rng.randbytes(32) for n in sorted(rng.sample(range(nblocks), count))})
    body = encode_map(m)
    plain_size = len(body)
    whole = names.random_id()
    await v.store.put(names.MAPS + whole, (await _seal_v1(v, whole, body)))
    chunked = await v.put_map(m)
    del m, body

    async def walk(fmt: int) -> int:
        tracemalloc.start()
        try:
            maps: list[MapView]
            if fmt == 1:
                maps = [open_map_entries(v.keyring, whole,
                                         await v.store.get(names.MAPS + whole))]
            else:
                maps = [await open_chunked(v.store, v.keyring, chunked)]
            seen = 0
            async for _first, _end, blocks in ChainRanges(maps, nblocks).walk(8192):
                seen += len(blocks)
            assert seen == count
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    try:
        v1_peak, v2_peak = await walk(1), await walk(2)
    finally:
        await v.close()
    assert v1_peak > plain_size, (v1_peak, plain_size)  # the whole map was held
    assert v2_peak < plain_size / 4, (v2_peak, plain_size)


async def _seal_v1(v: Vault, map_id: str, plain: bytes) -> bytes:
    from vault.maps import seal_map_plaintext
    return seal_map_plaintext(v.keyring, map_id, plain)


async def test_a_chunk_out_of_order_or_beside_its_table_is_refused(tmp_path: Path) -> None:
    """What a writer holding the key could get wrong: entries out of order inside a
    chunk, a chunk whose blocks are not the ones its table says; and a tail that
    points past the object."""
    v = await Vault.create(LocalStore(tmp_path / "vault"), KeyMaterial(keyfile=KEY))
    try:
        ids = [bytes([i + 1]) * 32 for i in range(4)]

        async def put(entries: list[tuple[int, bytes]], chunk: int) -> str:
            map_id = names.random_id()
            body = b"".join(ENTRY.pack(n, b) for n, b in entries)
            await v.store.put(names.MAPS + map_id,
                              seal_chunked(v.keyring, map_id, FULL, 100 * BS, BS, body, chunk))
            return map_id

        bad = await put([(5, ids[0]), (3, ids[1]), (9, ids[2]), (11, ids[3])], 4)
        m = await open_chunked(v.store, v.keyring, bad)  # its table is in order
        with pytest.raises(IntegrityError, match="out of order") as e:
            await m.chunk(0)
        assert e.value.object_name == names.MAPS + bad
        beyond = await put([(5, ids[0]), (150, ids[1])], 1)  # block 150 of a 100-block disk
        with pytest.raises(IntegrityError, match="beyond the disk"):
            await open_chunked(v.store, v.keyring, beyond)
        good = await put([(5, ids[0]), (7, ids[1]), (9, ids[2])], 2)
        m = await open_chunked(v.store, v.keyring, good)
        assert [c.count for c in m.chunks] == [2, 1] and m.firsts == [5, 9]
        raw = bytearray(await v.store.get(names.MAPS + good))
        tlen, _magic = TAIL.unpack(raw[-TAIL.size:])
        raw[-TAIL.size:] = TAIL.pack(len(raw), MAGIC)  # a table longer than the object
        await v.store.put(names.MAPS + good, bytes(raw))
        with pytest.raises(IntegrityError, match="no chunk table"):
            await open_chunked(v.store, v.keyring, good)
        assert tlen > 0
    finally:
        await v.close()
