"""A resync basis streamed per range of blocks (#16): the process server reads a point
back ``resync_range_blocks`` at a time (vault/fpstream.py) and the agent writes the MAP
frames to a file it maps, so neither holds a whole disk's fingerprints in its own
memory. With ranges of a few blocks the result is byte for byte today's (the whole map
of vault/fpmap.py, the disk's own fingerprints, an exact restore of the resync's
point); the memory held scales with the range, not the disk (tracemalloc, a count of
bytes); a map that does not match its point's digest is refused at the end of the
stream, after some MAP frames, and the agent falls back to a full cycle."""

from __future__ import annotations

import mmap
import shutil
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.digest import DiskDigest, block_count, fingerprint
from common.labels import CRASH
from mobility.cycleplan import BASIS_SUFFIX
from mobility.tracker import DiskState, load_map, write_map
from tests.helpers import (
    BLOCK,
    Pki,
    agent_config,
    make_agent,
    make_disk,
    make_vault,
    mutate,
    open_vault,
    point_restores_to,
    proc_config,
    running_procserver,
    sha256,
    write_full_point,
)
from tests.test_memory_streaming import _build, _open
from vault.errors import IntegrityError
from vault.fpmap import point_fingerprints
from vault.fpstream import DEFAULT_SPAN, fingerprint_ranges
from vault.index import Index
from vault.point import Point
from vault.repo import Vault
from vault.writer import CycleWriter, DiskSpec


async def _streamed(vault: Vault, point: Point, disk: str, span: int) -> bytes:
    """The ranges joined, each checked to follow the one before."""
    out = bytearray()
    async for first, fps in fingerprint_ranges(vault, point, disk,
                                               index=await vault.load_index(), span=span):
        assert first * 16 == len(out) and 0 < len(fps) <= 16 * span
        out += fps
    return bytes(out)


async def test_ranges_give_the_whole_map_of_every_point(tmp_path: Path) -> None:
    """Delta chains with changed and zeroed blocks, and a short last block."""
    root = tmp_path / "built"
    root.mkdir()
    await _build(root)
    vault = await _open(root)
    try:
        points = await vault.list_points()
        assert len(points) == 20 and any(p.base for p in points)
        for p in points:
            whole = await point_fingerprints(vault, p, "d0", index=await vault.load_index())
            for span in (1, 7, 64, DEFAULT_SPAN):
                assert await _streamed(vault, p, "d0", span) == whole, (p.id, span)
    finally:
        await vault.close()
    (tmp_path / "short").mkdir()
    _url, key = await make_vault(tmp_path / "short")
    disk = tmp_path / "short.img"
    make_disk(disk, 3 * (1 << 20) + 12345, seed=9)  # zeros, data and a short last block
    data = disk.read_bytes()
    vault = await open_vault(tmp_path / "short" / "vault", key)
    try:
        point = await write_full_point(vault, data)
        want = b"".join(fingerprint(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK))
        for span in (1, 5, 49, 50, DEFAULT_SPAN):
            assert await _streamed(vault, point, "sda", span) == want, span
    finally:
        await vault.close()


async def _point_with_digest(vault: Vault, machine: str, size: int, data: dict[int, bytes],
                             digest: str) -> Point:
    with ThreadPoolExecutor(2) as ex:
        w = CycleWriter(vault, await vault.load_index(), ex, machine=machine, cycle="c1",
                        disks=[DiskSpec("sda", size, BLOCK)], full=True, base=None)
        await w.add([(0, n, b) for n, b in sorted(data.items())])
        return await w.finish({"sda": digest}, CRASH)


async def test_a_map_that_misses_its_digest_never_gets_its_last_range(tmp_path: Path) -> None:
    _url, key = await make_vault(tmp_path)
    vault = await open_vault(tmp_path / "vault", key)
    try:
        size = 40 * BLOCK
        point = await _point_with_digest(vault, "m", size, {3: b"x" * BLOCK}, "00" * 32)
        got: list[int] = []
        with pytest.raises(IntegrityError, match="does not match the digest"):
            async for first, _fps in fingerprint_ranges(vault, point, "sda",
                                                        index=await vault.load_index(),
                                                        span=8):
                got.append(first)
        assert got == [0, 8, 16, 24]  # the fifth and last range is held back
    finally:
        await vault.close()


async def test_memory_scales_with_the_range_not_the_disk(tmp_path: Path) -> None:
    """A sparse disk of 2^19 blocks (a whole map: 8 MiB of fingerprints) with data
    scattered over it; tracemalloc's peak while the ranges are read, in bytes."""
    nblocks, span = 1 << 19, 1024
    size = nblocks * BLOCK
    _url, key = await make_vault(tmp_path)
    vault = await open_vault(tmp_path / "vault", key)
    # Frames of four blocks: a reader holds one frame a read in flight, whatever the disk
    # (1 MiB in a real vault); small here so that the bound measures what grows with it.
    vault.frame_target = 4 * BLOCK
    try:
        data = {n: n.to_bytes(8, "little") * (BLOCK // 8) for n in range(7, nblocks, 499)}
        zero = fingerprint(bytes(BLOCK))
        d = DiskDigest()
        for n in range(nblocks):
            b = data.get(n)
            d.update(zero if b is None else fingerprint(b))
        point = await _point_with_digest(vault, "big", size, data, d.hexdigest())
        index = await vault.load_index()
        assert isinstance(index, Index)

        async def peak_of_ranges(span: int) -> int:
            tracemalloc.start()
            try:
                count = 0
                async for _first, fps in fingerprint_ranges(vault, point, "sda", index=index,
                                                             span=span):
                    count += len(fps) // 16
                assert count == nblocks
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

        tracemalloc.start()
        try:
            await point_fingerprints(vault, point, "sda", index=index)
            whole = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        small, larger = await peak_of_ranges(span), await peak_of_ranges(8 * span)
        assert whole > 16 * nblocks  # the whole map at least
        # The map's plaintext (about 1050 entries of 40 bytes) plus what a range holds:
        # within a tenth of the whole map, and growing with the range.
        assert small < 16 * nblocks / 10, (small, whole)
        assert small < larger < 16 * nblocks / 2, (small, larger)
        print(f"peak bytes: whole map {whole}, ranges of {span} {small}, of {8 * span} "
              f"{larger}")
    finally:
        await vault.close()


async def test_a_resync_through_ranges_of_three_blocks_is_exact(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    cfg = proc_config(tmp_path, pki, url, key, resync_range_blocks=3)
    a = tmp_path / "a.img"
    make_disk(a, (5 << 20) + 4321, seed=21)  # a short last block
    async with running_procserver(cfg) as ps:
        acfg = agent_config(tmp_path, pki, "web01", ps.port, {"sda": a})
        agent = make_agent(acfg)
        try:
            r = await agent.replicate_once()
            assert r.kind == "full"
            await ps.wait_point(r.cycle)
            shutil.rmtree(acfg.state_dir)  # the agent lost its maps
            changed = mutate(a, 0.1, seed=22, zero_share=0.3)
            r = await agent.replicate_once()
            # Exactly the blocks that differ from the point crossed the wire: the basis
            # was the point's map, byte for byte.
            assert r.kind == "resync" and 0 < r.blocks_sent <= len(set(changed))
            await point_restores_to(ps, tmp_path, key, r.cycle, {"sda": sha256(a)})
            assert not list(Path(acfg.state_dir).glob(f"*{BASIS_SUFFIX}"))  # committed
        finally:
            agent.close()


async def test_a_basis_refused_after_its_map_frames_is_dropped(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """The vault's point of the machine has a digest its blocks do not match: the
    server sends ranges, then ERROR no_basis instead of the last; the agent drops the
    basis and sends a full cycle."""
    url, key = vault_at
    disk = tmp_path / "d.img"
    make_disk(disk, 2 << 20, seed=31)
    raw = disk.read_bytes()
    vault = await open_vault(tmp_path / "vault", key)
    try:
        blocks = {n: raw[n * BLOCK:(n + 1) * BLOCK] for n in range(block_count(len(raw), BLOCK))
                  if any(raw[n * BLOCK:(n + 1) * BLOCK])}
        await _point_with_digest(vault, "bad01", len(raw), blocks, "00" * 32)
    finally:
        await vault.close()
    async with running_procserver(proc_config(tmp_path, pki, url, key,
                                              resync_range_blocks=4)) as ps:
        acfg = agent_config(tmp_path, pki, "bad01", ps.port, {"sda": disk})
        agent = make_agent(acfg)
        try:
            r = await agent.replicate_once()
            assert r.kind == "full" and r.bytes_sent >= sum(map(len, blocks.values()))
            await point_restores_to(ps, tmp_path, key, r.cycle, {"sda": sha256(disk)})
            assert not list(Path(acfg.state_dir).glob(f"*{BASIS_SUFFIX}"))
        finally:
            agent.close()


def test_the_agents_own_map_is_mapped_and_replaced_whole(tmp_path: Path) -> None:
    """A delta's old map is a read-only memory map of the file, not a copy in the
    agent's memory; writing a map of the same name replaces the file, so a mapping
    still in use keeps what it read."""
    ds = DiskState(size=10 * BLOCK + 1, block_size=BLOCK, map_file="sda.c1.fp")
    first = bytes(range(16)) * 11
    write_map(tmp_path, ds.map_file, first)
    old = load_map(tmp_path, ds)
    assert isinstance(old, mmap.mmap) and old[:] == first
    write_map(tmp_path, ds.map_file, bytes(16 * 11))
    assert old[:] == first  # the old file's content, still mapped
    again = load_map(tmp_path, ds)
    assert isinstance(again, mmap.mmap) and again[:] == bytes(16 * 11)
    write_map(tmp_path, ds.map_file, first[:-16])  # not this disk's size: not trusted
    assert load_map(tmp_path, ds) is None
    assert load_map(tmp_path, DiskState(0, BLOCK, "gone.fp")) is None
    empty = DiskState(0, BLOCK, "empty.fp")
    write_map(tmp_path, empty.map_file, b"")
    assert load_map(tmp_path, empty) == b""
    old.close()
    again.close()
