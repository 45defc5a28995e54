"""instant/ against the vault: a damaged pack is an I/O error and never data, one fetch
serves concurrent reads of a block, hydration keeps to its rate, and the table of where
a disk's blocks are is the same however many ranges it was built in."""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.pacing import Schedule, TokenBucket
from instant import protocol as p
from instant.hydrate import HydrationProgress, hydrate
from instant.pointdisk import PointDisk
from tests.helpers import BLOCK, open_vault
from tests.test_instant_nbd import NBLOCKS, Client, Site, _build, run, served
from vault import names
from vault.errors import IntegrityError, UnindexedBlocksError
from vault.mapranges import RANGE_BLOCKS


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return _build(tmp_path_factory.mktemp("instant-vault"))


async def test_a_damaged_block_is_an_io_error_never_data(site: Site, tmp_path: Path) -> None:
    # A copy of the vault with one byte of block 1's sealed bytes flipped.
    copy = Site(**{**site.__dict__, "vault_dir": tmp_path / "vault"})
    shutil.copytree(site.vault_dir, copy.vault_dir)
    v = await open_vault(copy.vault_dir, copy.key)
    try:
        bmap = await v.resolve_map(site.point, "sda")
        loc = (await v.load_index()).entries[bmap.blocks[1]]
    finally:
        await v.close()
    pack = copy.vault_dir / names.pack_name(loc.pack_id)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x40
    pack.write_bytes(bytes(raw))

    sock = tmp_path / "nbd.sock"
    async with served(copy, tmp_path / "ov", sock) as (disk, _server):
        c = await Client.connect(sock)
        await c.go()
        assert (await c.cmd(p.CMD_READ, BLOCK, 512))[0] == p.EIO
        assert not disk.overlay.present(1)
        # Blocks of other spans of the pack read as they should, on the same connection.
        far = (NBLOCKS - 2) * BLOCK
        assert await c.cmd(p.CMD_READ, far, BLOCK) == (0, site.data[far:far + BLOCK])
        assert (await c.cmd(p.CMD_READ, BLOCK, 512))[0] == p.EIO  # still, not cached
        await c.close()
        with pytest.raises(IntegrityError, match="failed verification"):
            await hydrate(disk)
        assert not disk.overlay.complete and not disk.overlay.present(1)


async def test_the_block_table_built_in_ranges_is_the_whole_ones(site: Site, tmp_path: Path
                                                                  ) -> None:
    """Built from the point's chain of maps a range at a time (the whole disk, 7 blocks, one
    block), the table places every block alike — block 7, stored once and also held at
    block 3, one entry of its pack for both — and the disk reads back byte for byte."""
    v = await open_vault(site.vault_dir, site.key)
    try:
        with ThreadPoolExecutor(2) as ex:
            disks = [await PointDisk.open(v, site.point, "sda", str(tmp_path / f"o{span}"),
                                          executor=ex, range_blocks=span)
                     for span in (RANGE_BLOCKS, 7, 1)]
            try:
                views = []
                for disk in disks:
                    t = disk._table
                    views.append([t.entry(*t.locate(n)) if t.in_map(n) else None
                                  for n in range(NBLOCKS + 1)])
                    assert all(t.start(pk, i) <= t.start(pk, i + 1)  # each pack in offset order
                               for pk in range(len(t.pack_ids)) for i in range(t.count(pk) - 1))
                assert views[1] == views[0] and views[2] == views[0]
                shared = views[0][3]
                assert shared is not None and shared.blocks == (3, 7) and views[0][7] == shared
                assert {disk.stored_blocks for disk in disks} == {
                    sum(1 for e in views[0] if e is not None)}
                assert await disks[2].read(0, len(site.data)) == site.data
            finally:
                for disk in disks:
                    await disk.close()
    finally:
        await v.close()


async def test_blocks_in_no_index_are_counted_and_the_first_named(site: Site, tmp_path: Path
                                                                    ) -> None:
    """With the vault's index objects gone, opening the disk fails naming how many of its
    blocks are in no index and the lowest one, whatever the range size."""
    copy = tmp_path / "vault"
    shutil.copytree(site.vault_dir, copy)
    for obj in (copy / "index").iterdir():
        obj.unlink()
    stored = [n for n in range(NBLOCKS + 1) if site.data[n * BLOCK:(n + 1) * BLOCK].strip(b"\0")]
    v = await open_vault(copy, site.key)
    try:
        with ThreadPoolExecutor(2) as ex:
            for span in (RANGE_BLOCKS, 7, 1):
                with pytest.raises(UnindexedBlocksError) as err:
                    await PointDisk.open(v, site.point, "sda", str(tmp_path / f"o{span}"),
                                         executor=ex, range_blocks=span)
                assert (err.value.missing, err.value.first) == (len(stored), stored[0])
    finally:
        await v.close()


async def test_concurrent_reads_of_a_block_share_one_fetch(site: Site, tmp_path: Path
                                                            ) -> None:
    v = await open_vault(site.vault_dir, site.key)
    try:
        with ThreadPoolExecutor(2) as ex:
            got = []
            for i, readers in enumerate((1, 4)):
                disk = await PointDisk.open(v, site.point, "sda", str(tmp_path / f"o{i}"),
                                            executor=ex)
                try:
                    reads = await asyncio.gather(*(disk.read(3 * BLOCK + 100, 1000)
                                                   for _ in range(readers)))
                    assert set(reads) == {site.data[3 * BLOCK + 100:3 * BLOCK + 1100]}
                    got.append(disk.fetched_bytes)
                finally:
                    await disk.close()
    finally:
        await v.close()
    assert got[0] == got[1] > 0


async def test_hydration_keeps_to_its_rate(site: Site, tmp_path: Path) -> None:
    clock = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:  # time passes only when hydration waits
        slept.append(s)
        clock[0] += s

    rate = 200_000.0  # bytes/s: a quarter second is 50 kB, less than a block's span
    bucket = TokenBucket(Schedule.constant(rate), monotonic=lambda: clock[0], sleep=sleep)
    seen: list[HydrationProgress] = []
    v = await open_vault(site.vault_dir, site.key)
    try:
        with ThreadPoolExecutor(2) as ex:
            disk = await PointDisk.open(v, site.point, "sda", str(tmp_path / "ov"),
                                        executor=ex)
            try:
                await hydrate(disk, bucket, progress=seen.append)
                assert disk.overlay.image_path.read_bytes() == site.data
                fetched = disk.fetched_bytes
            finally:
                await disk.close()
    finally:
        await v.close()
    # One second's burst is free; every byte after it is paid for in waiting.
    assert clock[0] >= (fetched - rate) / rate - 0.01
    assert clock[0] <= fetched / rate + 0.01
    assert len(slept) > 5  # paced span by span, not in one wait
    dones = [s.done for s in seen]
    assert dones == sorted(dones) and seen[-1].complete and seen[0].done < seen[-1].done


async def test_reads_while_hydrating_see_the_point(site: Site, tmp_path: Path) -> None:
    """Guest reads and hydration fetch side by side (sharing fetches in flight); both end
    with the point's bytes."""
    async def sleep(_s: float) -> None:
        await asyncio.sleep(0)  # let the reads in between every span

    bucket = TokenBucket(Schedule.constant(100_000.0), monotonic=lambda: 0.0, sleep=sleep)
    sock = tmp_path / "nbd.sock"
    async with served(site, tmp_path / "ov", sock) as (disk, server):
        hydration = asyncio.create_task(hydrate(disk, bucket))
        c = await Client.connect(sock)
        await c.go()
        for n in range(NBLOCKS, -1, -3):  # from the end: against hydration's walk
            at = n * BLOCK
            ln = min(BLOCK + 333, len(site.data) - at)
            assert await c.cmd(p.CMD_READ, at, ln) == (0, site.data[at:at + ln]), n
        await c.close()
        await run("nbdcopy", server.uri, str(tmp_path / "copy.img"))
        await hydration
        assert disk.overlay.complete
    assert (tmp_path / "copy.img").read_bytes() == site.data
    assert (tmp_path / "ov" / "disk.img").read_bytes() == site.data
