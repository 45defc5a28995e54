"""The process server's components, each alone (no TLS listener): built with what they use,
on real parts — a real bookkeeping database, a real local vault, a real configuration
server (the ``cs`` fixture) — never a ProcServer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from common.digest import block_count, digest_of_fingerprint_map, fingerprint
from common.timefmt import now_iso
from configserver import db as cs_db
from configserver.server import ConfigServer
from procserver import db
from procserver.cache import SEGMENT_MAGIC, segment_path
from procserver.cachespace import CacheSpace
from procserver.csclient import ConfigServerClient
from procserver.cycles import COMPLETE, OPEN, CycleBook
from procserver.metrics import ProcMetrics
from procserver.policies import POLICY_FILE, ItemPolicy, Policies, PolicyAnswerError, parse_answer
from procserver.reporter import Identity, Reporter
from procserver.supervisor import Supervisor, TaskCrashedError
from procserver.trust import TrustList
from procserver.uploader import Uploader
from procserver.vaultaccess import VaultAccess, VaultUnavailableError
from tests.helpers import Pki, make_vault, restore_all
from vault.keyslots import KeyMaterial, read_keyfile
from vault.store.open import open_store
from wire.protocol import FrameType, ProtocolError, block_frame_parts

BLOCK = 64 * 1024
DEAD_URL = "http://127.0.0.1:9"  # discard port: nothing answers


@dataclass
class Book:
    engine: AsyncEngine
    sm: async_sessionmaker[AsyncSession]
    cache_dir: Path
    metrics: ProcMetrics
    sup: Supervisor


@pytest.fixture
async def book(tmp_path: Path) -> AsyncIterator[Book]:
    """A bookkeeping database and a cache directory, as the process server has them."""
    engine, sm = await db.open_db(str(tmp_path / "procserver.db"))
    cache = tmp_path / "cache"
    cache.mkdir()
    sup = Supervisor()
    try:
        yield Book(engine, sm, cache, ProcMetrics(), sup)
    finally:
        await sup.drain(5)
        await sup.cancel()
        await engine.dispose()


def _space(b: Book, quota: int) -> CacheSpace:
    return CacheSpace(quota, b.metrics.cache_bytes, b.sup.spawn)


def _gauge(b: Book, name: str) -> float:
    v = b.metrics.registry.get_sample_value(f"siterecovery_procserver_{name}")
    assert v is not None
    return v


# -- cache space ---------------------------------------------------------------------------
async def test_cache_space_reserves_releases_and_applies_backpressure(book: Book) -> None:
    space = _space(book, 100)
    await space.reserve(1, 60)
    waiting = asyncio.ensure_future(space.reserve(2, 50))  # would pass the quota: waits
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiting), 0.2)
    assert (space.used, _gauge(book, "cache_bytes")) == (60, 60)
    space.release(1, 20)  # 40 + 50 fits now
    await asyncio.wait_for(waiting, 5)
    assert space.used == 90
    await space.reserve(2, 30, wait=False)  # sealing what arrived: past the quota
    assert space.used == 120
    space.release(2)  # everything cycle 2 holds
    space.release(1)
    assert (space.used, _gauge(book, "cache_bytes")) == (0, 0)
    space.release(7, 10)  # a cycle that holds nothing frees nothing
    assert space.used == 0


# -- the cycle book ------------------------------------------------------------------------
async def _cycle(b: Book, cid: str, machine: str, state: str, *, frames: int | None = None,
                 next_segment: int = 0, end: dict[str, object] | None = None,
                 disks: list[dict[str, object]] | None = None) -> int:
    doc = {"cycle": cid, "full": True, "consistency": "crash",
           "disks": disks or [{"name": "sda", "size": 4 * BLOCK, "block_size": BLOCK}]}
    async with b.sm() as s:
        row = db.Cycle(id=cid, machine=machine, state=state, full=True, base=None,
                       begin_doc=json.dumps(doc), end_doc=json.dumps(end) if end else None,
                       created=1.0)
        s.add(row)
        await s.flush()
        if frames is not None:
            s.add(db.ReceiveProgress(cycle_seq=row.seq, frames=frames, last_disk=0,
                                     last_block=frames - 1, next_segment=next_segment))
        await s.commit()
        return row.seq


async def _states(b: Book) -> dict[str, str]:
    async with b.sm() as s:
        return {c.id: c.state for c in (await s.execute(select(db.Cycle))).scalars()}


async def test_cycle_book_recovers_resumable_cycles_and_aborts_the_rest(book: Book) -> None:
    old = await _cycle(book, "c-old", "m1", db.RECEIVING, frames=1, next_segment=1)
    new = await _cycle(book, "c-new", "m1", db.RECEIVING, frames=2, next_segment=1)
    await _cycle(book, "c-done", "m2", db.COMPLETE)
    for machine, cid, files in (("m1", "c-old", 1), ("m1", "c-new", 2), ("m2", "c-done", 1),
                                ("m3", "stray", 1)):
        d = book.cache_dir / machine / cid
        d.mkdir(parents=True)
        for n in range(files):  # c-new: segment 1 was never sealed (recorded)
            segment_path(d, n).write_bytes(SEGMENT_MAGIC + bytes(100 * (n + 1)))
    space = _space(book, 1 << 20)
    woken: list[str] = []
    cycles = CycleBook(book.sm, book.cache_dir, space, 600.0,
                       wake_uploader=lambda: woken.append("wake"), spawn=book.sup.spawn)
    await cycles.recover()

    assert await _states(book) == {"c-old": db.ABORTED, "c-new": db.RECEIVING,
                                   "c-done": db.COMPLETE}
    assert list(cycles.open) == ["c-new"] and cycles.suspended() == 1
    oc = cycles.open["c-new"]
    assert (oc.seq, oc.frames, oc.last, oc.next_segment) == (new, 2, (0, 1), 1)
    assert not segment_path(oc.cycle_dir, 1).exists()  # the unsealed tail is gone
    assert not (book.cache_dir / "m1" / "c-old").exists()
    assert not (book.cache_dir / "m3" / "stray").exists()
    held = len(SEGMENT_MAGIC) + 100  # c-new's sealed segment; c-done's the same size
    assert space.used == 2 * held

    await cycles.supersede("m1", new + 1)  # its agent began a newer cycle: aborted
    assert oc.state != OPEN and cycles.open == {} and woken == ["wake"]
    assert (await _states(book))["c-new"] == db.ABORTED
    assert not oc.cycle_dir.exists() and space.used == held
    assert old < new


async def test_a_resume_window_that_passes_aborts_the_cycle(book: Book) -> None:
    await _cycle(book, "c1", "m1", db.RECEIVING, frames=0)
    space = _space(book, 1 << 20)
    cycles = CycleBook(book.sm, book.cache_dir, space, 0.05, wake_uploader=lambda: None,
                       spawn=book.sup.spawn)
    async with cycles.changed:
        await cycles.recover()
        assert cycles.suspended() == 1
        await asyncio.wait_for(cycles.changed.wait_for(lambda: not cycles.open), 10)
    assert await _states(book) == {"c1": db.ABORTED}


async def test_a_cycle_whose_end_is_durable_is_never_aborted(book: Book) -> None:
    """A session cancelled right after its END's commit (a RESUME taking over, a
    shutdown), before it could mark the cycle complete, settles by aborting it: the book
    finds the row complete and refuses — the cache stays, no abort hook runs, the
    uploader is woken — so the cycle becomes the point its END promised."""
    seq = await _cycle(book, "c1", "m1", db.RECEIVING, frames=1, next_segment=1)
    d = book.cache_dir / "m1" / "c1"
    d.mkdir(parents=True)
    segment_path(d, 0).write_bytes(SEGMENT_MAGIC + bytes(100))
    space = _space(book, 1 << 20)
    woken: list[str] = []
    cycles = CycleBook(book.sm, book.cache_dir, space, 600.0,
                       wake_uploader=lambda: woken.append("wake"), spawn=book.sup.spawn)
    aborted: list[tuple[str, str, str]] = []

    async def hook(machine: str, cycle: str, reason: str) -> None:
        aborted.append((machine, cycle, reason))

    cycles.on_abort.append(hook)
    await cycles.recover()
    oc = cycles.open["c1"]
    async with book.sm() as s:  # the END's commit, its session cancelled after it
        row = await s.get_one(db.Cycle, seq)
        row.state = db.COMPLETE
        await s.commit()
    await cycles.abort(oc, "its session ended")
    assert await _states(book) == {"c1": db.COMPLETE}
    assert segment_path(d, 0).exists() and space.used == len(SEGMENT_MAGIC) + 100
    assert (oc.state, woken, aborted, cycles.open) == (COMPLETE, ["wake"], [], {})


# -- the uploader --------------------------------------------------------------------------
async def _vault_access(tmp: Path) -> VaultAccess:
    url, key = await make_vault(tmp)
    return VaultAccess(open_store(url), KeyMaterial(keyfile=read_keyfile(key)))


async def test_the_uploader_turns_a_cached_cycle_into_a_whole_point(
        book: Book, tmp_path: Path) -> None:
    size = 3 * BLOCK + 1000  # a short last block
    data = bytearray(os.urandom(size))
    data[BLOCK:2 * BLOCK] = bytes(BLOCK)  # a zero block, sent as ZERO
    blocks = [bytes(data[n * BLOCK:(n + 1) * BLOCK]) for n in range(block_count(size, BLOCK))]
    digest = digest_of_fingerprint_map(b"".join(fingerprint(b) for b in blocks))
    end = {"cycle": "c1", "blocks": len(blocks), "digests": {"sda": digest},
           "created": now_iso()}
    seq = await _cycle(book, "c1", "web01", db.COMPLETE, end=end,
                       disks=[{"name": "sda", "size": size, "block_size": BLOCK}])
    cycle_dir = book.cache_dir / "web01" / "c1"
    cycle_dir.mkdir(parents=True)
    async with book.sm() as s:
        for number, chunk in enumerate((blocks[:2], blocks[2:])):  # two sealed segments
            first = 0 if number == 0 else 2
            out = bytearray(SEGMENT_MAGIC)
            for i, b in enumerate(chunk, first):
                zero = not any(b)
                head, payload = block_frame_parts(
                    FrameType.ZERO if zero else FrameType.BLOCK, 0, i, b"" if zero else b)
                out += head + payload
            path = segment_path(cycle_dir, number)
            path.write_bytes(out)
            s.add(db.Segment(cycle_seq=seq, seq=number, path=str(path), size=len(out)))
        await s.commit()
    space = _space(book, 1 << 30)
    space.hold(seq, sum(p.stat().st_size for p in cycle_dir.iterdir()))
    vaults = await _vault_access(tmp_path)
    points: list[str] = []
    with ThreadPoolExecutor(2) as ex:
        up = Uploader(book.sm, vaults, book.cache_dir, space, ex, book.metrics, 2,
                      on_point=lambda: points.append("point"))
        vaults.on_open = up.wake
        book.sup.start("uploader", up.run())
        with pytest.raises(VaultUnavailableError):
            vaults.vault  # noqa: B018 - not open yet: the cycle waits in the cache
        await vaults.open()
        up.wake()
        point_id = await up.wait_point("c1", timeout=60)
        point = await vaults.vault.read_point(point_id)
        assert await restore_all(vaults.vault, point, tmp_path / "out") == \
            {"sda": hashlib.sha256(data).hexdigest()}
        await book.sup.cancel()
    await vaults.close()
    assert points == ["point"] and space.used == 0 and not cycle_dir.exists()
    assert _gauge(book, "recovery_points_total") == 1
    async with book.sm() as s:
        report = await s.get_one(db.PointReport, point_id)
        assert (report.machine, report.reported) == ("web01", False)  # in the outbox
        assert (await s.execute(select(db.Segment))).scalars().all() == []
    assert await _states(book) == {"c1": db.UPLOADED}


# -- the supervisor ------------------------------------------------------------------------
async def test_a_crashed_service_fails_the_supervisor(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    sup = Supervisor()
    done = asyncio.Event()

    async def finishes() -> None:
        done.set()

    async def crashes() -> None:
        await done.wait()
        raise OSError("disk on fire")

    async def forever() -> None:
        await asyncio.Event().wait()

    sup.start("finishes", finishes())
    sup.start("crashes", crashes())
    sup.start("forever", forever())
    crash = await asyncio.wait_for(sup.failed, 5)
    assert isinstance(crash, TaskCrashedError) and crash.name == "crashes"
    assert isinstance(crash.error, OSError)
    assert sup.running == ["forever"]
    assert await sup.cancel() == 1 and sup.running == []
    out = capsys.readouterr().out
    assert "task_crashed" in out and "disk on fire" in out


async def test_shutdown_waits_for_work_within_the_grace_and_cancels_the_rest() -> None:
    sup = Supervisor()
    release = asyncio.Event()

    async def quick() -> None:
        await release.wait()

    async def stuck() -> None:
        await asyncio.Event().wait()

    q = sup.spawn(quick())
    s = sup.spawn(stuck())
    release.set()
    assert await sup.drain(0.5) == 1
    assert q.done() and not q.cancelled() and s.cancelled()
    assert await sup.drain(0.5) == 0


# -- the trust list ------------------------------------------------------------------------
def _ca_sha256(path: str) -> str:
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


async def test_the_trust_list_refuses_unknown_machines_of_the_configuration_server(
        cs: ConfigServer, tmp_path: Path) -> None:
    client = ConfigServerClient(cs.url, str(cs.cfg.internal_token_path),
                                str(cs.cfg.ca_dir / "ca.pem"))
    trust = TrustList(client, tmp_path, str(cs.cfg.ca_dir / "ca.pem"))
    sup = Supervisor()
    sup.start("trust", trust.run())
    try:
        await trust.wait_until(lambda t: t.version is not None, timeout=30)
        assert trust.applies
        with pytest.raises(ProtocolError) as e:
            await trust.authorize("ghost", {"serialNumber": "0A"})
        assert e.value.code == "machine_unknown"
        assert (tmp_path / "trust.json").is_file()  # saved for a restart
    finally:
        await sup.cancel()
        await client.close()
    assert not sup.failed.done()


async def test_a_saved_trust_list_applies_after_a_restart_without_the_configuration_server(
        tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "trust.json").write_text(json.dumps({
        "version": "v7", "ca_sha256": _ca_sha256(pki.ca_path), "revoked": ["ab"],
        "machines": [{"name": "web01", "enabled": True, "serials": ["ab", "cd"],
                      "disks": ["sda"]},
                     {"name": "off01", "enabled": False, "serials": ["ef"]}]}))
    client = ConfigServerClient(DEAD_URL, str(tmp_path / "no-token"), pki.ca_path)
    trust = TrustList(client, tmp_path, pki.ca_path)
    sup = Supervisor()
    sup.start("trust", trust.run())
    try:
        await trust.wait_until(lambda t: t.version == "v7")
        await trust.authorize("web01", {"serialNumber": "00CD"})  # trusted
        await trust.authorize_disks("web01", ["sda"])
        for machine, serial, code in (("web01", "AB", "certificate_revoked"),
                                      ("web01", "99", "certificate_unknown"),
                                      ("off01", "EF", "machine_disabled"),
                                      ("ghost", "CD", "machine_unknown")):
            with pytest.raises(ProtocolError) as e:
                await trust.authorize(machine, {"serialNumber": serial})
            assert e.value.code == code, machine
        with pytest.raises(ProtocolError) as e:
            await trust.authorize_disks("web01", ["sdb"])
        assert e.value.code == "disk_not_allowed"
    finally:
        await sup.cancel()
        await client.close()


# -- the reporter --------------------------------------------------------------------------
async def test_the_reporter_reports_points_and_parks_a_refused_one(
        cs: ConfigServer, book: Book) -> None:
    good = {"id": "b" * 64, "machine": "web01", "created": now_iso(), "consistency": "crash"}
    bad = dict(good, id="a" * 64, consistency="bogus")  # first in order, refused for good
    async with book.sm() as s:
        for doc in (bad, good):
            s.add(db.PointReport(point_id=doc["id"], machine="web01", doc=json.dumps(doc),
                                 reported=False))
        await s.commit()
    client = ConfigServerClient(cs.url, str(cs.cfg.internal_token_path),
                                str(cs.cfg.ca_dir / "ca.pem"))
    reporter = Reporter(client, Identity("ps-test", "127.0.0.1", lambda: 9443), book.sm,
                        book.cache_dir, _space(book, 1 << 30), book.metrics.registry, 30.0)
    book.sup.start("reporter", reporter.run())
    try:
        async with asyncio.timeout(30), reporter.passed:
            await reporter.passed.wait_for(lambda: reporter.passes >= 1)
        async with book.sm() as s:
            rows = {r.point_id: r.reported
                    for r in (await s.execute(select(db.PointReport))).scalars()}
        assert rows == {bad["id"]: False, good["id"]: True}
        assert reporter.parked == {bad["id"]}
        async with cs.sessionmaker() as s:  # the catalog has exactly the good one
            ids = set((await s.execute(select(cs_db.RecoveryPoint.id))).scalars())
        assert ids == {good["id"]}
    finally:
        await book.sup.cancel()
        await client.close()


# -- policies ------------------------------------------------------------------------------
POLICY = {"name": "gold", "rpo_threshold_seconds": 900, "retention_hours": 24,
          "app_consistent_frequency_seconds": 3600, "crash_consistent_interval_seconds": 300,
          "block_size": BLOCK}


def test_policy_answers_are_parsed_whole_or_not_at_all() -> None:
    items = parse_answer({"items": [{"machine": "web01", "policy": POLICY}]})
    assert items == {"web01": ItemPolicy(machine="web01", **POLICY)}  # type: ignore[arg-type]
    bad: object
    for bad in ({"items": {}}, {"items": [{"machine": "web 01", "policy": POLICY}]},
                {"items": [{"machine": "web01", "policy": dict(POLICY, retention_hours=0)}]},
                {"items": [{"machine": "web01", "policy": POLICY}] * 2},
                {"items": [{"machine": "web01", "policy": dict(POLICY, block_size=True)}]}):
        with pytest.raises(PolicyAnswerError):
            parse_answer(bad)


async def test_pulled_policies_are_saved_and_loaded_at_the_next_start(
        tmp_path: Path, book: Book) -> None:
    vaults = await _vault_access(tmp_path)
    client = ConfigServerClient(DEAD_URL, str(tmp_path / "token"), "")

    def policies() -> Policies:
        return Policies(client, tmp_path, 300.0, "ps-test", lambda: True, book.sm, vaults)

    first = policies()
    assert (first.items, first.known) == ({}, False)
    first.items = parse_answer({"items": [{"machine": "web01", "policy": POLICY}]})
    await first._save()
    assert (tmp_path / POLICY_FILE).is_file()
    again = policies()  # a restart while the configuration server is away
    assert again.known and again.items == first.items
    (tmp_path / POLICY_FILE).write_text("{not json")
    assert policies().items == {}  # unreadable: nothing is half-applied
    await vaults.close()

