"""A long-lived vault object (a process server's: each retention round, each session's
resync basis) reads only the manifests that changed since its last scan
(``Vault.scan_points``, ``BlobInfo.version``): a manifest rewritten under its id (as a
prune's rebase does), one added, one deleted, one tampered with, each seen at once; and
vault objects given one cache (the configuration server's recovery jobs) read each
manifest once between them. On a local folder and on Azure Blob (Azurite), the reads
counted by the store's own metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from vault import names
from vault.keyslots import KeyMaterial
from vault.manifestcache import MANIFEST_READS, ManifestCache
from vault.point import DiskEntry, Point
from vault.repo import Vault
from vault.store.instrument import StoreMetrics
from vault.store.open import open_store
from vault.store.protocol import BlobInfo

KEY = bytes(range(32))
POINTS = MANIFEST_READS + 8  # more than one batch of reads


@pytest.fixture(params=["local", "azure"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "local":
        yield f"file://{tmp_path / 'vault'}"
        return
    conn = tmp_path / "azure-conn"
    conn.write_text(request.getfixturevalue("azurite_conn"))
    conn.chmod(0o600)
    yield f"azure://s{secrets.token_hex(6)}/vault?connection_string_file={conn}"


def _point(i: int) -> Point:
    return Point(id=secrets.token_hex(32), machine=f"m{i % 3}",
                 created=f"2026-12-08T00:00:{i:02d}.000000Z", consistency="crash",
                 cycle=secrets.token_hex(16), base=None, chain=0,
                 disks=[DiskEntry("sda", 1 << 30, 65536, secrets.token_hex(32), "full",
                                  secrets.token_hex(32))], format=3)


async def test_a_second_scan_reads_only_what_changed(url: str) -> None:
    km = KeyMaterial(keyfile=KEY)
    writer = await Vault.create(open_store(url), km)
    registry = CollectorRegistry()
    reader = await Vault.open(open_store(url, StoreMetrics(registry)), km)

    def gets() -> float:
        return registry.get_sample_value("siterecovery_vault_store_operations_total",
                                         {"op": "get", "outcome": "ok"}) or 0.0

    try:
        points = [_point(i) for i in range(POINTS)]
        for p in points:
            await writer.put_point(p)
        before = gets()
        first = await reader.scan_points()
        assert first.points == points and not first.damaged
        assert gets() - before == POINTS
        before = gets()
        assert (await reader.scan_points()).points == points  # nothing changed: no read
        assert (await reader.scan_points("m1")).points == [p for p in points
                                                           if p.machine == "m1"]
        assert gets() == before

        # Another writer: a manifest replaced under its id, of the same size (a rebase),
        # one more point, one deleted.
        old = points[5]
        rebased = dataclasses.replace(old, disks=[dataclasses.replace(
            old.disks[0], map=secrets.token_hex(32))])
        await writer.put_point(rebased)
        added = _point(POINTS)
        await writer.put_point(added)
        await writer.store.delete(names.POINTS + points[7].id)
        want = [rebased if p is old else p for p in points if p is not points[7]] + [added]
        scan = await reader.scan_points()
        assert scan.points == want and not scan.damaged
        assert gets() - before == 2  # the rebased one and the new one
        before = gets()

        # Tampered with in the store, its size kept: read again and named, every scan.
        name = names.POINTS + points[9].id
        raw = bytearray(await writer.store.get(name))
        raw[len(raw) // 2] ^= 1
        await writer.store.put(name, bytes(raw))
        for _ in range(2):
            scan = await reader.scan_points()
            assert [n for n, _e in scan.damaged] == [name]
            assert scan.points == [p for p in want if p is not points[9]]
        assert gets() - before == 2
        # A vault object of its own (a check, a CLI) reads every manifest.
        fresh = await Vault.open(reader.store, km)
        before = gets()
        assert (await fresh.scan_points()).points == scan.points
        assert gets() - before == len(want)  # the damaged one too
    finally:
        await reader.close()
        await writer.close()


async def test_vault_objects_given_one_cache_read_each_manifest_once(url: str) -> None:
    """The configuration server's recovery jobs: a vault object each, one cache. Five
    scans at once read each manifest once between them; a later object reads none; a
    vault object of another vault in the same cache sees only its own points."""
    km = KeyMaterial(keyfile=KEY)
    writer = await Vault.create(open_store(url), km)
    other_url = url.replace("vault", "other", 1)
    other = await Vault.create(open_store(other_url), km)
    registry = CollectorRegistry()
    metrics = StoreMetrics(registry)
    cache = ManifestCache()

    def gets() -> float:
        return registry.get_sample_value("siterecovery_vault_store_operations_total",
                                         {"op": "get", "outcome": "ok"}) or 0.0

    async def reader(at: str = url) -> Vault:
        v = await Vault.open(open_store(at, metrics), km)
        v.manifests = cache
        return v

    readers: list[Vault] = []
    try:
        points = [_point(i) for i in range(POINTS)]
        for p in points:
            await writer.put_point(p)
        mine = _point(POINTS)
        await other.put_point(mine)
        readers = [await reader() for _ in range(5)]
        before = gets()
        scans = await asyncio.gather(*(r.scan_points(f"m{i % 3}")
                                       for i, r in enumerate(readers)))
        assert gets() - before == POINTS  # not five times over
        for i, scan in enumerate(scans):
            assert scan.points == [p for p in points if p.machine == f"m{i % 3}"]
        readers += [await reader(), await reader(other_url)]
        before = gets()
        assert (await readers[-2].scan_points()).points == points
        assert gets() == before
        assert (await readers[-1].scan_points()).points == [mine]
        assert gets() - before == 1
    finally:
        for v in (*readers, writer, other):
            await v.close()


async def test_a_scan_cancelled_mid_read_leaves_the_read_to_those_still_waiting() -> None:
    cache, info, point = ManifestCache(), BlobInfo("points/p", 100, "v1"), _point(0)
    started, release = asyncio.Event(), asyncio.Event()
    reads: list[int] = []

    async def read() -> Point:
        reads.append(1)
        started.set()
        await release.wait()
        return point

    # Run in the order made: the first starts the read, the second then waits for it,
    # both before the started event wakes this test.
    first = asyncio.create_task(cache.read("vault", info, read))
    second = asyncio.create_task(cache.read("vault", info, read))
    await started.wait()
    assert reads == [1]
    first.cancel()
    release.set()
    assert await second == point
    assert first.cancelled() and reads == [1, 1]  # read again by the scan still waiting
    assert cache.of("vault") == {"points/p": ("v1", point)}
    assert await cache.read("vault", info, read) == point and reads == [1, 1]
