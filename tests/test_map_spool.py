"""vault/mapspool.py and ``ChunkSealer``: a chunked map sealed as its entries come, into an
unlinked file, and put from it a part at a time: the bytes ``seal_chunked`` makes, in
memory that does not grow with the map."""

from __future__ import annotations

import os
import random
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vault.crypto import Keyring
from vault.keyslots import KeyMaterial
from vault.mapchunks import ChunkSealer, open_chunked, seal_chunked
from vault.maps import DELTA, ENTRY, FULL, ZERO_ID
from vault.mapspool import MapSpool
from vault.repo import Vault
from vault.store.local import LocalStore
from vault.writer import CycleWriter, DiskSpec

KEY = bytes(range(32))
MASTER = bytes(range(64))
BS = 4096


def _entries(count: int, seed: int = 1) -> Iterator[tuple[int, bytes]]:
    rng = random.Random(seed)
    n = -1
    for i in range(count):
        n += rng.randint(1, 4)
        yield n, i.to_bytes(8, "little") * 4


@pytest.mark.parametrize("per_chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("pieces", [1, 2, 5, 50])
def test_sealing_as_entries_come_makes_seal_chunkeds_bytes(per_chunk: int,
                                                            pieces: int) -> None:
    keyring = Keyring(MASTER)
    entries = list(_entries(100))
    body = b"".join(ENTRY.pack(n, b) for n, b in entries)
    want = seal_chunked(keyring, "ab" * 32, FULL, 1 << 30, BS, body, per_chunk,
                        table_nonce=bytes(12))
    parts: list[bytes] = []
    sealer = ChunkSealer(keyring, "ab" * 32, FULL, 1 << 30, BS, parts.append, per_chunk)
    step = -(-len(entries) // pieces)
    for lo in range(0, len(entries), step):  # in pieces of any size
        sealer.extend(entries[lo:lo + step])
    assert sealer.finish(table_nonce=bytes(12)) == len(want)
    assert b"".join(parts) == want


def test_entries_out_of_order_are_refused() -> None:
    sealer = ChunkSealer(Keyring(MASTER), "ab" * 32, DELTA, 1 << 30, BS, lambda b: None, 4)
    sealer.extend([(5, bytes(32)), (6, bytes(32))])
    with pytest.raises(ValueError, match="increasing block order: 6 after 6"):
        sealer.extend([(6, bytes(32))])
    with pytest.raises(ValueError, match="1 to"):
        ChunkSealer(Keyring(MASTER), "ab" * 32, DELTA, 1 << 30, BS, lambda b: None, 0)


async def test_a_spooled_map_reads_back_and_its_file_is_gone(tmp_path: Path) -> None:
    v = await Vault.create(LocalStore(tmp_path / "vault"), KeyMaterial(keyfile=KEY))
    v.map_chunk_entries = 1000
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    m = v.map_writer(FULL, 1 << 40, BS, spool_dir=spool_dir)
    assert isinstance(m, MapSpool)
    entries = list(_entries(5555))
    fds = set(os.listdir("/proc/self/fd"))
    try:
        m.extend(entries[:100])
        m.extend(entries[100:])
        map_id = await v.put_map(m)
        assert m.count == len(entries)
        assert os.listdir(spool_dir) == []  # unlinked from the start
    finally:
        m.close()
    assert set(os.listdir("/proc/self/fd")) < fds  # its file closed
    cm = await open_chunked(v.store, v.keyring, map_id)
    assert len(cm.chunks) == 6
    got = [e for i in range(len(cm.chunks)) for e in ENTRY.iter_unpack(await cm.chunk(i))]
    assert got == entries
    await v.close()


async def test_a_spooled_map_holds_a_chunk_not_the_map(tmp_path: Path) -> None:
    v = await Vault.create(LocalStore(tmp_path / "vault"), KeyMaterial(keyfile=KEY))
    v.map_chunk_entries = 10_000

    async def peak_for(count: int) -> int:
        m = v.map_writer(FULL, 1 << 40, BS, spool_dir=tmp_path)
        assert isinstance(m, MapSpool)
        tracemalloc.start()
        try:
            m.extend(_entries(count))
            await v.put_map(m)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            m.close()

    small = await peak_for(40_000)
    large = await peak_for(400_000)  # 16 MB of plaintext, 28 rows of table per 10 000
    assert large < small + (1 << 20), (small, large)
    assert large < 2 << 20, large  # against 16 MB held twice when built in memory
    await v.close()


async def test_a_cycles_changes_and_map_do_not_grow_its_memory(tmp_path: Path) -> None:
    # A delta cycle zeroing many blocks (no data to hash or pack: what is measured is
    # what the writer keeps per block) checkpointed as the process server does: its
    # changes past their budget go to runs, its map to a spool.
    v = await Vault.create(LocalStore(tmp_path / "vault"), KeyMaterial(keyfile=KEY))
    v.map_chunk_entries = 10_000
    size = 1 << 40
    with ThreadPoolExecutor(1) as ex:
        index = await v.load_index()
        w = CycleWriter(v, index, ex, machine="m1", cycle="c0",
                        disks=[DiskSpec("sda", size, BS)], full=True, base=None)
        await w.add([(0, 0, b"x" * BS)])
        base = await w.finish({"sda": "00" * 32}, "crash")

        async def peak_for(count: int, cycle: str) -> tuple[int, int]:
            w = CycleWriter(v, index, ex, machine="m1", cycle=cycle,
                            disks=[DiskSpec("sda", size, BS)], full=False, base=base,
                            spill_dir=tmp_path, changes_limit=10_000)
            tracemalloc.start()
            try:
                for lo in range(0, count, 5_000):
                    await w.add([(0, n, None) for n in range(lo, lo + 5_000)])
                    await w.checkpoint()
                runs = w.changes[0].runs
                point = await w.finish({"sda": "00" * 32}, "crash")
                return tracemalloc.get_traced_memory()[1], runs
            finally:
                tracemalloc.stop()
                assert point.disks[0].map_kind == "delta"
                m = await v.read_map(point.disks[0].map)
                assert len(m.blocks) == count and set(m.blocks.values()) == {ZERO_ID}

        small, small_runs = await peak_for(40_000, "c1")
        large, large_runs = await peak_for(200_000, "c2")
    assert (small_runs, large_runs) == (4, 20)
    # 200 000 blocks: 8 MB of changes and 8 MB of map, each held whole before.
    assert large < small + (1 << 20), (small, large)
    await v.close()
