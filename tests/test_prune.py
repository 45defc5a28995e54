"""Retention, prune and garbage collection (invariant 6), and vault locks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog.testing

from common.digest import digest_of_fingerprint_map, fingerprint
from tests.helpers import REPO, make_vault, open_vault, restore_all
from vault import names
from vault.keyslots import KeyMaterial, read_keyfile
from vault.locks import Lock, LockedError, list_locks, locked, remove_locks, try_acquire
from vault.point import Point
from vault.prune import prune
from vault.repo import MAX_CHAIN, Vault
from vault.retention import Retention, plan
from vault.store.faults import FaultStore
from vault.store.local import LocalStore
from vault.store.protocol import BlobStore
from vault.store.wrapper import StoreWrapper
from vault.writer import CycleWriter, DiskSpec

BS = 64 * 1024
NBLOCKS = 24
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pt(pid: str, age_h: float, consistency: str = "crash", machine: str = "m") -> Point:
    return Point(id=pid, machine=machine, created=_iso(NOW - timedelta(hours=age_h)),
                 consistency=consistency, cycle=pid, base=None, chain=0, disks=[])


# -- the policy, as a pure function -----------------------------------------------------

def test_plan_thins_like_asr() -> None:
    pts = [_pt("a", 0.2), _pt("b", 0.9),                      # keep-all window
           _pt("c", 3.1), _pt("d", 3.4), _pt("e", 3.6),       # one hourly bucket
           _pt("f", 30.2), _pt("g", 30.7),                    # one 2-hour bucket
           _pt("h", 60.1), _pt("i", 61.0), _pt("j", 61.5),    # one 4-hour bucket
           _pt("k", 80.0), _pt("l", 100.0)]                   # past retention
    keep = plan(pts, Retention(), NOW)
    assert {"a", "b"} <= set(keep)
    assert [x for x in "cde" if x in keep] == ["e"] or len([x for x in "cde" if x in keep]) == 1
    assert len([x for x in "fg" if x in keep]) == 1
    assert len([x for x in "hij" if x in keep]) == 1
    assert "k" not in keep and "l" not in keep
    assert keep["a"] == "newest"


def test_plan_keeps_app_consistent_and_newest_of_each_machine() -> None:
    pts = [_pt("old-app", 200, "app"), _pt("x1", 300, machine="other"),
           _pt("c1", 3.1), _pt("app", 3.3, "app"), _pt("c2", 3.6), _pt("new", 0.1)]
    keep = plan(pts, Retention(), NOW)
    assert keep["x1"] == "newest"  # the only point of its machine, however old
    assert "app" in keep and "c2" not in keep and "c1" not in keep  # app wins its bucket
    assert "old-app" not in keep  # a newer app-consistent point exists
    pts.remove(pts[3])
    assert plan(pts, Retention(), NOW)["old-app"] == "newest app-consistent"


def test_plan_refuses_shrinking_windows() -> None:
    with pytest.raises(ValueError):
        plan([], Retention(keep_all_hours=5, hourly_hours=2), NOW)


# -- a real vault with a history of points -------------------------------------------------

AGES = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 5.5, 5.4, 5.3, 5.2, 5.1, 3, 2, 1.5, 0.5,
        0.2]


async def _history(tmp: Path, ages: list[float] = AGES, now: datetime = NOW
                   ) -> tuple[Path, Path, dict[str, str]]:
    """One machine, one disk, a point per age (oldest first), each changing some blocks."""
    tmp.mkdir(parents=True, exist_ok=True)
    _url, key = await make_vault(tmp)
    v = await open_vault(tmp / "vault", key)
    rng = random.Random(5)
    disk = bytearray(rng.randbytes(NBLOCKS * BS))
    disk[BS:2 * BS] = bytes(BS)
    expected: dict[str, str] = {}
    base: Point | None = None
    with ThreadPoolExecutor(2) as ex:
        index = await v.load_index()
        for i, age in enumerate(ages):
            changed = list(range(NBLOCKS)) if i == 0 else rng.sample(range(NBLOCKS), 6)
            for n in changed[: 1 if i else 0]:
                disk[n * BS:(n + 1) * BS] = bytes(BS)  # some blocks become zero
            for n in changed[1 if i else 0:]:
                disk[n * BS:(n + 1) * BS] = rng.randbytes(BS)
            w = CycleWriter(v, index, ex, machine="web01", cycle=f"c{i}",
                            disks=[DiskSpec("sda", len(disk), BS)], full=i == 0, base=base)
            await w.add([(0, n, bytes(disk[n * BS:(n + 1) * BS])) for n in changed])
            fps = b"".join(fingerprint(bytes(disk[n * BS:(n + 1) * BS]))
                           for n in range(NBLOCKS))
            base = await w.finish({"sda": digest_of_fingerprint_map(fps)}, "crash",
                                  _iso(now - timedelta(hours=age)))
            expected[base.id] = hashlib.sha256(disk).hexdigest()
    await v.close()
    return tmp / "vault", key, expected


async def _assert_restores(vault: Vault, expected: dict[str, str], out: Path,
                           only: set[str] | None = None) -> None:
    for p in await vault.list_points():
        if only is None or p.id in only:
            assert await restore_all(vault, p, out) == {"sda": expected[p.id]}, p.id


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


async def test_prune_keeps_every_retained_point_exact(tmp_path: Path) -> None:
    vdir, key, expected = await _history(tmp_path)
    before = _size(vdir)
    v = await open_vault(vdir, key)
    assert max(p.chain for p in await v.list_points()) == MAX_CHAIN  # chains were cut
    with ThreadPoolExecutor(2) as ex:
        report = await prune(v, Retention(), ex, now=NOW)
    assert report.forgotten and report.rebased and report.packs_deleted
    left = {p.id for p in await v.list_points()}
    assert left == set(report.kept)
    await _assert_restores(v, expected, tmp_path / "out")
    assert _size(vdir) < before
    # Nothing unreferenced stays: a second prune has nothing to do.
    with ThreadPoolExecutor(2) as ex:
        again = await prune(v, Retention(), ex, now=NOW)
    assert (again.forgotten, again.packs_deleted, again.maps_deleted) == ([], 0, 0)
    await v.close()


async def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    vdir, key, _ = await _history(tmp_path, AGES[:6])
    snapshot = {f: f.read_bytes() for f in vdir.rglob("*") if f.is_file()}
    v = await open_vault(vdir, key)
    with ThreadPoolExecutor(2) as ex:
        report = await prune(v, Retention(), ex, now=NOW, dry_run=True)
    await v.close()
    assert report.forgotten
    assert {f: f.read_bytes() for f in vdir.rglob("*") if f.is_file()} == snapshot


def _mutations(vdir: Path, key: Path) -> int:
    """How many puts and deletes a full prune of this vault does."""
    async def count() -> int:
        store = FaultStore(LocalStore(vdir))
        v = await Vault.open(store, KeyMaterial(keyfile=read_keyfile(key)))
        with ThreadPoolExecutor(2) as ex:
            async with locked(v, "exclusive", "count"):
                await prune(v, Retention(), ex, now=datetime.now(UTC))
        return store.mutations

    return asyncio.run(count())


async def _prune_cli(vdir: Path, key: Path, crash_after: int = 0) -> int:
    url = f"fault+file://{vdir}?crash_after={crash_after}" if crash_after else f"file://{vdir}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "siterecovery", "prune", "--vault", url, "--key-file", str(key),
        "--json", cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode in (0, 137), err.decode()
    if proc.returncode == 0:
        json.loads(out)
    return proc.returncode


async def test_prune_killed_at_many_points_never_loses_a_retained_point(tmp_path: Path) -> None:
    # The CLI prunes as of the real clock: date the history from it.
    pristine, key, expected = await _history(tmp_path / "pristine", AGES, datetime.now(UTC))
    # The points a completed prune keeps: each must restore after every kill.
    v = await open_vault(pristine, key)
    retained = set(plan(await v.list_points(), Retention(), datetime.now(UTC)))
    await v.close()
    scratch = tmp_path / "scratch"
    shutil.copytree(pristine, scratch)
    total = await asyncio.to_thread(_mutations, scratch, key)
    assert total > 20
    rng = random.Random(11)
    kill_points = sorted({1, 2, 3, total - 1, total, *rng.sample(range(4, total - 1), 9)})
    for n in kill_points:
        work = tmp_path / f"kill-{n}"
        shutil.copytree(pristine, work)
        assert await _prune_cli(work, key, crash_after=n) == 137
        v = await open_vault(work, key)
        await _assert_restores(v, expected, tmp_path / "out", retained)
        await v.close()
        assert await _prune_cli(work, key) == 0  # run again: the dead holder's lock is stale
        v = await open_vault(work, key)
        assert {p.id for p in await v.list_points()} == retained
        await _assert_restores(v, expected, tmp_path / "out")
        assert await list_locks(v) == ([], [])
        await v.close()
        shutil.rmtree(work)


# -- locks -------------------------------------------------------------------------------

async def test_prune_is_excluded_while_a_writer_holds_the_vault(tmp_path: Path) -> None:
    _url, key = await make_vault(tmp_path)
    v = await open_vault(tmp_path / "vault", key)
    async with locked(v, "shared", "upload web01"):
        async with locked(v, "shared", "upload db01"):
            pass  # writers share
        with pytest.raises(LockedError, match="upload web01"):
            async with locked(v, "exclusive", "prune"):
                pass
    async with locked(v, "exclusive", "prune"):
        with pytest.raises(LockedError, match="prune"):
            async with locked(v, "shared", "upload web01"):
                pass
    assert await list_locks(v) == ([], [])
    await v.close()


class _LockPuts(StoreWrapper):
    """Sets ``twice`` once two locks have been written through it."""

    def __init__(self, inner: BlobStore) -> None:
        super().__init__(inner)
        self.puts = 0
        self.twice = asyncio.Event()

    async def put(self, name: str, data: bytes | bytearray) -> None:
        await self.inner.put(name, data)
        if name.startswith(names.LOCKS):
            self.puts += 1
            if self.puts >= 2:
                self.twice.set()


async def test_a_waiting_prune_backs_off_then_gets_the_released_vault(tmp_path: Path) -> None:
    _url, key = await make_vault(tmp_path)
    v = await open_vault(tmp_path / "vault", key)
    writer = await try_acquire(v, "shared", "upload web01")
    assert isinstance(writer, Lock)
    with pytest.raises(LockedError, match="upload web01"):  # a short wait runs out
        async with locked(v, "exclusive", "prune", wait=0.2):
            pass

    async def prune_waiting() -> None:
        async with locked(v, "exclusive", "prune", wait=60):
            assert [lk.kind for lk in (await list_locks(v))[0]] == ["exclusive"]

    v.store = watch = _LockPuts(v.store)
    with structlog.testing.capture_logs() as logs:
        waiting = asyncio.create_task(prune_waiting())
        await asyncio.wait_for(watch.twice.wait(), 30)  # found it locked, backed off, retried
        await writer.release()
        await asyncio.wait_for(waiting, 30)
    assert sum(e["event"] == "vault_locked_waiting" for e in logs) >= 1
    assert await list_locks(v) == ([], [])
    await v.close()


async def test_stale_locks_are_ignored_and_removed(tmp_path: Path) -> None:
    _url, key = await make_vault(tmp_path)
    v = await open_vault(tmp_path / "vault", key)
    from vault.locks import _encode

    dead = names.random_id()
    await v.store.put(names.LOCKS + dead, _encode(v, dead, "exclusive", "prune", 0.0))
    async with locked(v, "shared", "upload"):  # an expired exclusive lock is in no one's way
        pass
    assert [lk.id for lk in await remove_locks(v)] == [dead]
    assert await list_locks(v) == ([], [])
    await v.close()


async def test_replication_continues_correctly_after_a_prune(
        tmp_path: Path, pki: object, procserver: object, vault_at: tuple[str, Path]) -> None:
    from procserver.server import ProcServer
    from tests.helpers import Pki, agent_config, make_agent, make_disk, mutate, sha256

    assert isinstance(pki, Pki) and isinstance(procserver, ProcServer)
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 << 20, seed=21)
    original = disk.read_bytes()
    agent = make_agent(agent_config(tmp_path, pki, "web01", procserver.port, {"sda": disk}))
    try:
        for i in range(3):
            if i:
                mutate(disk, 0.5, seed=i)
            await procserver.wait_point((await agent.replicate_once()).cycle)
        v = await open_vault(tmp_path / "vault", vault_at[1])
        # Everything but the newest point goes; the full base is rebased away and
        # its now mostly-dead pack repacked, while the process server keeps running.
        with ThreadPoolExecutor(2) as ex:
            async with locked(v, "exclusive", "prune"):
                report = await prune(v, Retention(0, 0, 0, 0), ex)
        assert len(report.forgotten) == 2 and report.packs_deleted
        # Back to the first image: its blocks now live only in packs the prune deleted or
        # rewrote, so deduplicating against the index the server had before would point
        # the new point at data that is gone.
        disk.write_bytes(original)
        r = await agent.replicate_once()
        point = await v.read_point(await procserver.wait_point(r.cycle))
        assert await restore_all(v, point, tmp_path / "out") == {"sda": sha256(disk)}
        await v.close()
    finally:
        agent.close()
