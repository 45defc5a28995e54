"""Process-server failover (#17), every part real, on a SQLite and on a PostgreSQL catalog:
two process-server daemons registered with a configuration server, a machine's agent on
the first; ``kill -9`` of the first while it holds an acknowledged cycle it could not
upload (the test holds the vault's exclusive lock). The machine moves to the second by a
job with an event; the agent follows its settings and its first cycle there is a resync
by basis (a delta on the vault's newest point, not a full copy). The first comes back,
drains its cache (the acknowledged cycle becomes the point it would have been, without
moving the machine's latest point back) and keeps no machine. Every acknowledged point
restores byte-exact.

Also: assignment by measured load (``configserver/assignment.py``) on catalog rows."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from configserver import assignment, db, pshealth
from configserver.config import ConfigServerConfig
from configserver.jobs import JobEngine
from configserver.pshealth import MOVED
from configserver.server import ConfigServer
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.enroll import enroll_with_passphrase
from mobility.siteclient import SiteClient
from siterecovery.apiclient import ApiCallError, ApiClient
from siterecovery.tomlconfig import load
from tests.backends import fresh_database
from tests.csclock import Clock, clocked_configserver
from tests.helpers import (
    Daemon,
    make_disk,
    make_vault,
    mutate,
    open_vault,
    restore_all,
    sha256,
    write_toml,
)
from tests.managedsite import issue_procserver_cert
from tests.sitehelpers import heartbeat, step, step_running, wait_job
from vault.locks import acquire

SILENT_AFTER = 6.0  # procserver_failover_seconds: heartbeats come every 0.5 s


@pytest.fixture
async def cs(tmp_path: Path, catalog_url: str) -> AsyncIterator[ConfigServer]:
    """On SQLite and on PostgreSQL: the move, its job and event, the resync, end to end."""
    server = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0, database_url=catalog_url,
        procserver_failover_seconds=SILENT_AFTER))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _procserver_toml(cs: ConfigServer, api: ApiClient, tmp: Path, name: str,
                           url: str, key: Path) -> Path:
    tls = tmp / f"{name}-tls"
    await issue_procserver_cert(api, tls, name)
    return write_toml(tmp / f"{name}.toml", {
        "data_dir": str(tmp / name), "vault_url": url, "vault_key_file": str(key),
        "tls_cert": str(tls / "server.pem"), "tls_key": str(tls / "server.key"),
        "tls_ca": str(cs.ca.cert_path), "listen_port": 0, "metrics_port": 0, "name": name,
        "configserver_url": cs.site_url,
        "configserver_token_file": str(cs.cfg.internal_token_path),
        "heartbeat_interval_seconds": 0.5})


async def _until(cs: ConfigServer, check: Any, timeout: float = 120) -> Any:
    """``await check()`` once it returns something true, re-checked on every change."""
    async with asyncio.timeout(timeout), cs.services.notifier.changed:
        while not (got := await check()):
            await cs.services.notifier.changed.wait()
    return got


async def _registered(cs: ConfigServer, api: ApiClient, name: str) -> None:
    async def known() -> bool:
        try:
            await api.get(f"/api/v1/procservers/{name}")
            return True
        except ApiCallError:
            return False
    await _until(cs, known)


async def _point_of(ps: Daemon, cycle: str) -> str:
    n = 1
    while True:
        for e in ps.events("point_uploaded"):
            if e.get("cycle") == cycle:
                return str(e["point"])
        await ps.wait_events("point_uploaded", n, timeout=180)
        n += 1


async def test_dead_procserver_machines_move_and_resync(cs: ConfigServer,
                                                        tmp_path: Path) -> None:
    url, key = await make_vault(tmp_path)
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 << 20, seed=17)
    async with ApiClient(cs.url, cs.admin_token) as api:
        toml1 = await _procserver_toml(cs, api, tmp_path, "ps1", url, key)
        toml2 = await _procserver_toml(cs, api, tmp_path, "ps2", url, key)
        ps1 = Daemon(["procserver", "run", "--config", str(toml1)], "procserver_started")
        ps2 = Daemon(["procserver", "run", "--config", str(toml2)], "procserver_started")
        ps1b: Daemon | None = None
        await ps1.start()
        await ps2.start()
        try:
            await _registered(cs, api, "ps1")
            await _registered(cs, api, "ps2")
            await api.post("/api/v1/machines", {
                "name": "web01", "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
                "os_version": "12", "disks": [{"name": "sda", "path": str(disk)}],
                "process_server": "ps1"})
            async with SiteClient(cs.site_url, str(cs.ca.cert_path)) as enrolling:
                cfg_path = await enroll_with_passphrase(
                    enrolling, cs.passphrase, tmp_path / "agent", machine="web01",
                    server_host="127.0.0.1", server_port=1, disks=[("sda", str(disk))])
            cfg = dataclasses.replace(load(MobilityConfig, cfg_path), snapshot="quiesced")
            await api.post("/api/v1/replication/enable", {"machine": "web01",
                                                          "policy": "default"})
            async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert,
                                  cfg.tls_key) as site:
                managed = ManagedAgent(cfg, site)
                try:
                    moved = await _scenario(cs, api, managed, disk, ps1, ps2, tmp_path, key)
                    # ps1 does not come back: the operator removes it, web01 goes on.
                    moved = await _never_back(cs, api, managed, disk, ps2, tmp_path, key,
                                              moved)
                    # ps1 comes back all the same: it registers again, drains what it
                    # acknowledged, then holds nothing.
                    ps1b = Daemon(["procserver", "run", "--config", str(toml1)],
                                  "procserver_started")
                    await ps1b.start()
                    await _returned(cs, api, ps1b, tmp_path, key, moved)
                finally:
                    managed.close()
        finally:
            for d in (ps1b, ps2):
                if d is not None and d.proc is not None:
                    await d.stop()
            if ps1.proc is not None and ps1.proc.returncode is None:
                await ps1.kill9()


@dataclasses.dataclass(frozen=True)
class _Moved:
    c2: str  # the cycle ps1 acknowledged and could not upload
    d2: str  # the disk's digest then
    p3: str  # the first point on ps2
    latest: str  # web01's newest point


async def _scenario(cs: ConfigServer, api: ApiClient, managed: ManagedAgent, disk: Path,
                    ps1: Daemon, ps2: Daemon, tmp: Path, key: Path) -> _Moved:
    d1 = sha256(disk)
    assert await managed.round()  # the initial copy, through ps1
    assert managed.last is not None and managed.last.kind == "full"
    p1 = await _point_of(ps1, managed.last.cycle)

    async def protected() -> bool:
        item = await api.get("/api/v1/items/web01")
        return bool(item["state"] == "protected")
    await _until(cs, protected)  # Enable and Finalize protection are over

    # A cycle ps1 acknowledges but cannot upload: a prune-like holder of the exclusive lock.
    vault = await open_vault(tmp / "vault", key)
    try:
        lock = await acquire(vault, "exclusive", "test: keep ps1 from uploading", wait=60)
        try:
            mutate(disk, 0.05, seed=18)
            d2 = sha256(disk)
            assert await managed.round()
            assert managed.last is not None and managed.last.kind == "delta"
            c2 = managed.last.cycle
            await ps1.kill9()
        finally:
            await lock.release()
    finally:
        await vault.close()
    assert not [e for e in ps1.events("point_uploaded") if e.get("cycle") == c2]

    # ps1 is silent past procserver_failover_seconds: web01 moves to ps2 by a job.
    async def move_job() -> dict[str, Any] | None:
        jobs = (await api.get("/api/v1/jobs", target="web01", kind="move_machine"))["jobs"]
        return jobs[0] if jobs else None
    job = await _until(cs, move_job)
    assert job["params"]["from"] == "ps1"
    job = await wait_job(api, job["id"], lambda j: step(j, "choose")["state"] == "succeeded")
    assert "to ps2; least loaded: ps2 (backlog" in step(job, "choose")["message"]
    machine = await api.get("/api/v1/machines/web01")
    assert machine["process_server"] == "ps2"
    events = (await api.get("/api/v1/events", target="web01", code=MOVED))["events"]
    assert len(events) == 1 and "moved from ps1" in events[0]["message"]

    # The agent follows its settings; ps2 does not know its base: a resync by basis.
    mutate(disk, 0.05, seed=19)
    d3 = sha256(disk)
    assert await managed.round()
    assert managed.last is not None and managed.last.kind == "resync"
    assert managed.last.bytes_sent < (8 << 20) // 4  # not a full copy: 5 % changed
    c3 = managed.last.cycle
    p3 = await _point_of(ps2, c3)
    job = await wait_job(api, job["id"], timeout=120)
    assert job["state"] == "succeeded", job
    assert f"first point on ps2: {p3[:16]}" in step(job, "resync")["message"]
    assert f"a delta on point {p1[:16]}" in step(job, "resync")["message"]
    vault = await open_vault(tmp / "vault", key)
    try:
        point = await vault.read_point(p3)
        assert point.base == p1
        assert (await restore_all(vault, point, tmp / "out3"))["sda"] == d3
        first = await vault.read_point(p1)
        assert (await restore_all(vault, first, tmp / "out1"))["sda"] == d1
    finally:
        await vault.close()
    return _Moved(c2, d2, p3, p3)


async def _never_back(cs: ConfigServer, api: ApiClient, managed: ManagedAgent, disk: Path,
                      ps2: Daemon, tmp: Path, key: Path, moved: _Moved) -> _Moved:
    """The dead process server never returns: nothing waits for it. The operator removes
    it (refused while machines are assigned to it, as ps2 shows); web01's next cycles are
    deltas on ps2's points; the cycle ps1 acknowledged never becomes a point, its data
    being in the resync's point already (``_scenario``); every point restores exact."""
    with pytest.raises(ApiCallError) as refused:
        await api.delete("/api/v1/procservers/ps2")
    assert refused.value.status == 409 and "web01" in refused.value.message
    await api.delete("/api/v1/procservers/ps1")
    with pytest.raises(ApiCallError) as gone:
        await api.get("/api/v1/procservers/ps1")
    assert gone.value.status == 404
    mutate(disk, 0.05, seed=20)
    d4 = sha256(disk)
    assert await managed.round()
    assert managed.last is not None and managed.last.kind == "delta"
    p4 = await _point_of(ps2, managed.last.cycle)

    async def recorded() -> list[str] | None:
        got = [p["id"] for p in (await api.get("/api/v1/points", machine="web01"))["points"]]
        return got if p4 in got else None
    points = await _until(cs, recorded)
    vault = await open_vault(tmp / "vault", key)
    try:
        point = await vault.read_point(p4)
        assert point.base == moved.p3
        assert (await restore_all(vault, point, tmp / "out4"))["sda"] == d4
        cycles = {(await vault.read_point(p)).cycle for p in points}
    finally:
        await vault.close()
    assert len(points) == 3 and moved.c2 not in cycles  # p1, p3, p4
    assert (await api.get("/api/v1/items/web01"))["latest_point"] == p4
    return dataclasses.replace(moved, latest=p4)


async def _returned(cs: ConfigServer, api: ApiClient, ps1b: Daemon, tmp: Path,
                    key: Path, moved: _Moved) -> None:
    p2 = await _point_of(ps1b, moved.c2)
    vault = await open_vault(tmp / "vault", key)
    try:
        point = await vault.read_point(p2)
        assert (await restore_all(vault, point, tmp / "out2"))["sda"] == moved.d2
    finally:
        await vault.close()

    async def drained() -> bool:  # its heartbeats hold nothing of web01 any more
        async with cs.services.sessionmaker() as s:
            row = await s.get(db.ProcessServer, "ps1")
            return row is not None and row.heartbeats > 0 and row.pending_cycles == {} \
                and await s.get(db.RecoveryPoint, p2) is not None
    await _until(cs, drained)
    item = await api.get("/api/v1/items/web01")
    assert item["latest_point"] == moved.latest  # never moved back to an older point
    assert (await api.get("/api/v1/machines/web01"))["process_server"] == "ps2"
    assert (await api.get("/api/v1/procservers/ps1"))["machines"] == 0
    async with cs.services.sessionmaker() as s:
        moves = (await s.execute(select(db.Job).where(db.Job.kind == "move_machine"))
                 ).scalars().all()
    assert len(moves) == 1  # ps1's return does not move anything back


# -- assignment by measured load ---------------------------------------------------------

def _ps(name: str, **kw: Any) -> db.ProcessServer:
    base: dict[str, Any] = dict(address=f"{name}:9443", registered_at=0.0, last_contact=1000.0,
                                cache_bytes=0, cache_free_ratio=1.0, backlog_seconds=0.0,
                                backlog_bytes=0, throughput_bps=0.0, sessions=0,
                                storage_failing_since=None)
    return db.ProcessServer(name=name, **{**base, **kw})


def test_assignment_prefers_measured_load_over_machine_count() -> None:
    now = 1010.0
    servers = [
        _ps("a", backlog_seconds=300.0),  # 5 min of backlog: loaded
        _ps("b", cache_free_ratio=0.5, sessions=1),  # half its cache used
        _ps("c", cache_free_ratio=0.95, sessions=3, throughput_bps=2e6),
        _ps("d", last_contact=0.0),  # silent
        _ps("e", cache_free_ratio=0.2),  # no room
        _ps("f", storage_failing_since=900.0),
    ]
    choice = assignment.choose(servers, {"c": 1, "a": 0}, now, 0.0)
    assert choice.server is not None and choice.server.name == "c"
    text = choice.explanation
    assert text.startswith("least loaded: c (backlog 0 s, cache 95% free, 3 agent(s), "
                           "uploading 2.0 MB/s); then b (")
    assert "a (backlog 300 s" in text and "d: no heartbeat for 16.8 min" in text
    assert "e: cache only 20% free" in text and "f: its uploads to the vault are failing" in text
    # The same figures: the fewer agents (sessions, or machines assigned when more) wins.
    even = [_ps("x", sessions=1), _ps("y", sessions=0)]
    assert assignment.choose(even, {"y": 2}, now, 0.0).server.name == "x"  # type: ignore[union-attr]
    none = assignment.choose([_ps("d", last_contact=0.0)], {}, now, 0.0, exclude=["z"])
    assert none.server is None and none.explanation.startswith(
        "no healthy process server with room (d: no heartbeat")


async def test_enable_protection_assigns_the_least_loaded(cs: ConfigServer) -> None:
    """Enable protection of a machine without a process server: the least-loaded healthy
    one, by what the heartbeats measured, and the step says why."""
    async with ApiClient(cs.url, cs.admin_token) as api, \
            ApiClient(cs.url, cs.services.internal_token) as internal:
        await heartbeat(internal, "busy", backlog_seconds=900, backlog_bytes=1 << 30,
                        sessions=1)
        await heartbeat(internal, "full", cache_free_ratio=0.1)
        await heartbeat(internal, "idle", cache_free_ratio=0.9, sessions=4,
                        throughput_bps=1e6)
        await api.post("/api/v1/machines", {
            "name": "db01", "ip": "192.0.2.11", "os_type": "linux", "os_name": "debian",
            "os_version": "12", "disks": [{"name": "sda", "path": "/dev/sda"}]})
        job = (await api.post("/api/v1/replication/enable", {"machine": "db01",
                                                            "policy": "default"}))["job"]
        job = await wait_job(api, job["id"], lambda j: step(j, "validate")["state"]
                             in ("succeeded", "failed"))
        message = step(job, "validate")["message"]
        assert message.startswith("machine db01, policy default, process server idle "
                                  "(idle.example:9443); least loaded: idle (backlog 0 s, "
                                  "cache 90% free, 4 agent(s), uploading 1.0 MB/s); then "
                                  "busy (backlog 900 s"), message
        assert message.endswith("not candidates: full: cache only 10% free")
        assert (await api.get("/api/v1/machines/db01"))["process_server"] == "idle"


async def test_failover_jobs_on_the_catalog(tmp_path: Path, catalog_url: str) -> None:
    """On SQLite and PostgreSQL, on the configuration server's clock: one move job per
    machine and outage, the event, the first point after the move; no candidate: the
    step fails with the figures and the machine stays."""
    clock = Clock()
    clock.now = t0 = 1_800_000_000.0
    async with clocked_configserver(tmp_path / "cs", catalog_url, clock,
                                    procserver_failover_seconds=900.0) as server, \
            ApiClient(server.url, server.admin_token) as api, \
            ApiClient(server.url, server.services.internal_token) as internal:
        for name in ("ps1", "ps2"):
            await heartbeat(internal, name)
        for m in ("web01", "web02"):
            await api.post("/api/v1/machines", {
                "name": m, "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
                "os_version": "12", "disks": [{"name": "sda", "path": "/dev/sda"}],
                "process_server": "ps1"})
        async with server.services.sessionmaker() as s:  # protected items, as if enabled
            for m in ("web01", "web02"):
                s.add(db.ReplicatedItem(machine=m, policy="default", state="protected",
                                        health="normal", health_errors=[],
                                        disk_progress={}, created=t0, updated=t0))
            await s.commit()
        async def moves(n: int) -> list[dict[str, Any]] | None:
            jobs: list[dict[str, Any]] = (await api.get("/api/v1/jobs",
                                                        kind="move_machine"))["jobs"]
            return jobs if len(jobs) >= n else None

        await api.post("/api/v1/alerts/evaluate")  # a change: the failover check looks
        assert await moves(1) is None  # ps1 is alive
        clock.now = t0 + 901
        await heartbeat(internal, "ps2")  # a change too
        queued = await _until(server, lambda: moves(2))
        assert sorted(j["target"] for j in queued) == ["web01", "web02"]
        await heartbeat(internal, "ps2")
        await api.post("/api/v1/alerts/evaluate")
        for job in queued:
            doc = await wait_job(api, job["id"], lambda j: step(j, "choose")["state"]
                                 == "succeeded")
            assert step(doc, "choose")["message"].startswith(
                f"{job['target']} moved from ps1 (no heartbeat since ")
        assert {m["name"]: m["process_server"] for m in
                (await api.get("/api/v1/machines"))["machines"]} == {
            "web01": "ps2", "web02": "ps2"}
        events = (await api.get("/api/v1/events", code=MOVED))["events"]
        assert sorted(e["target"] for e in events) == ["web01", "web02"]
        # The first point after the move ends the job (a point from before does not).
        await internal.post("/api/v1/internal/points", {
            "id": "a" * 64, "machine": "web01", "created": "2027-01-15T08:30:00.000000Z",
            "consistency": "crash", "base": "b" * 64})
        done = await wait_job(api, next(j["id"] for j in queued if j["target"] == "web01"))
        assert done["state"] == "succeeded"
        assert step(done, "resync")["message"] == (
            f"first point on ps2: {'a' * 16} of 2027-01-15T08:30:00.000000Z, a delta on "
            f"point {'b' * 16} (resync against the vault)")

        # ps2 goes silent too, and ps1 again: its machines have nowhere to go.
        clock.now = t0 + 2000
        await heartbeat(internal, "ps1")  # back, but web01 and web02 stay on ps2 until it fails
        clock.now = t0 + 2000 + 901
        async with server.services.sessionmaker() as s:
            s.add(db.Machine(name="db01", ip="192.0.2.8", os_type="linux", disks=[],
                             process_server="ps2", created=t0, enabled=True))
            s.add(db.ReplicatedItem(machine="db01", policy="default", state="protected",
                                    health="normal", health_errors=[], disk_progress={},
                                    created=t0, updated=t0))
            await s.commit()
        await api.post("/api/v1/alerts/evaluate")
        # Every machine on ps2 gets a job for this outage (web02's waits behind its first).
        late = [j for j in await _until(server, lambda: moves(5)) if j["target"] == "db01"]
        assert len(late) == 1
        doc = await wait_job(api, late[0]["id"])
        assert doc["state"] == "failed"
        assert step(doc, "choose")["message"].startswith(
            "no healthy process server with room (ps1: no heartbeat for 15.0 min); db01 "
            "stays on ps2")
        assert (await api.get("/api/v1/machines/db01"))["process_server"] == "ps2"
        jobs = await moves(5) or []
        assert len(jobs) == 5  # one per machine and outage
        first02 = await wait_job(api, next(j["id"] for j in queued if j["target"] == "web02"))
        assert first02["state"] == "failed" and step(first02, "resync")["message"] == (
            "ps2 went silent before web02's first point there; the next move job takes the "
            "machine on")


async def test_automatic_moves_can_be_turned_off(tmp_path: Path) -> None:
    """``procserver_failover_seconds = 0``: the failover loop never starts, so no machine
    moves however long its process server is silent, while the heartbeat alert still
    fires; the setting's range is checked."""
    cfg = ConfigServerConfig(data_dir=str(tmp_path / "x"))
    dataclasses.replace(cfg, procserver_failover_seconds=0.0).validate()
    for bad in (-1.0, 86401.0):
        with pytest.raises(ValueError, match="procserver_failover_seconds must be 0"):
            dataclasses.replace(cfg, procserver_failover_seconds=bad).validate()

    clock = Clock()
    clock.now = t0 = 1_800_000_000.0
    with capture_logs() as logs:
        async with clocked_configserver(tmp_path / "cs", f"sqlite+aiosqlite:///{tmp_path}/c.db",
                                        clock, procserver_failover_seconds=0.0) as server, \
                ApiClient(server.url, server.admin_token) as api, \
                ApiClient(server.url, server.services.internal_token) as internal:
            await heartbeat(internal, "ps1")
            clock.now = t0 + 86400
            await api.post("/api/v1/alerts/evaluate")
            active = (await api.get("/api/v1/events", active=True))["events"]
            assert [e["code"] for e in active] == ["procserver_heartbeat_missing"]
            # the loop that would move machines returned at once: it is not waiting
            await asyncio.wait_for(pshealth.run(server.services, t0, 30.0, 0.0), 5)
    assert [e["setting"] for e in logs if e.get("event") == "procserver_failover_off"] == [
        "procserver_failover_seconds"] * 2


async def test_two_configuration_servers_on_one_catalog_move_each_machine_once(
        tmp_path: Path, postgres_url: str) -> None:
    """Two configuration servers on one PostgreSQL catalog, one clock: a process server
    goes silent and both look for dead servers at once (their background loops and a
    pass each started together): one move job per machine, created by either, run by
    the job-engine leader; the standby's API shows the same."""
    url = await fresh_database(postgres_url)
    clock = Clock()
    clock.now = t0 = 1_800_000_000.0
    async with clocked_configserver(tmp_path / "a", url, clock,
                                    procserver_failover_seconds=900.0) as a, \
            clocked_configserver(tmp_path / "b", url, clock,
                                 procserver_failover_seconds=900.0) as b, \
            ApiClient(a.url, a.admin_token) as api_a, \
            ApiClient(b.url, b.admin_token) as api_b, \
            ApiClient(a.url, a.services.internal_token) as internal:
        for name in ("ps1", "ps2"):
            await heartbeat(internal, name)
        machines = [f"web{i:02d}" for i in range(1, 7)]
        for m in machines:
            await api_b.post("/api/v1/machines", {
                "name": m, "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
                "os_version": "12", "disks": [{"name": "sda", "path": "/dev/sda"}],
                "process_server": "ps1"})
        async with a.services.sessionmaker() as s:  # protected items, as if enabled
            for m in machines:
                s.add(db.ReplicatedItem(machine=m, policy="default", state="protected",
                                        health="normal", health_errors=[],
                                        disk_progress={}, created=t0, updated=t0))
            await s.commit()

        clock.now = t0 + 901
        await heartbeat(internal, "ps2")  # a change: both loops look (b woken by NOTIFY)
        queued = await asyncio.gather(*(pshealth.fail_over_once(x.services, t0, 900.0)
                                        for x in (a, b, a, b)))
        async with a.services.sessionmaker() as s:
            jobs = (await s.execute(select(db.Job).where(db.Job.kind == "move_machine"))
                    ).scalars().all()
        assert sorted(j.target for j in jobs) == machines  # one each, whoever made it
        assert sum(len(q) for q in queued) <= len(machines)
        for job in jobs:
            done = await wait_job(api_b, job.id, lambda j: step(j, "choose")["state"]
                                  == "succeeded")
            assert "moved from ps1" in step(done, "choose")["message"]
        shown = {m["name"]: m["process_server"]
                 for m in (await api_a.get("/api/v1/machines"))["machines"]}
        assert shown == dict.fromkeys(machines, "ps2")
        events = (await api_b.get("/api/v1/events", code=MOVED))["events"]
        assert sorted(e["target"] for e in events) == machines


async def test_two_configuration_servers_move_each_machine_once(
        tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two configuration servers on one PostgreSQL catalog, both watching for dead process
    servers on one clock: when ps1 goes silent, each of its machines gets one move job and
    one event however often and however concurrently both look (their checks race here);
    the leader stops in the middle of the moves and the standby finishes them."""
    monkeypatch.setattr(JobEngine, "recheck_seconds", 0.2)  # the standby's polls
    url = await fresh_database(postgres_url)
    clock = Clock()
    clock.now = t0 = 1_800_000_000.0
    machines = [f"web{i:02d}" for i in range(1, 5)]
    leader = clocked_configserver(tmp_path / "a", url, clock, procserver_failover_seconds=900.0)
    a = await leader.__aenter__()  # started first: it leads
    a_running = True
    try:
        async with clocked_configserver(tmp_path / "b", url, clock,
                                        procserver_failover_seconds=900.0) as b, \
                ApiClient(b.url, b.admin_token) as api_b, \
                ApiClient(b.url, b.services.internal_token) as internal_b:
            await _machines_on_ps1(b, api_b, internal_b, machines, t0)
            clock.now = t0 + 901
            await heartbeat(internal_b, "ps2")  # a change: both servers' loops look now
            up = min(a.services.alert_book.up_since, b.services.alert_book.up_since)
            for _ in range(3):  # and both at once, again and again
                await asyncio.gather(*(pshealth.fail_over_once(x.services, up, 900.0)
                                       for x in (a, b, a, b)))

            async def moves() -> list[dict[str, Any]]:
                got: list[dict[str, Any]] = (await api_b.get(
                    "/api/v1/jobs", kind="move_machine"))["jobs"]
                return got
            jobs = await moves()
            assert sorted(j["target"] for j in jobs) == machines  # one each

            # The leader runs them; it stops while they wait for the machines' first
            # points on ps2, and b takes them over.
            async with ApiClient(a.url, a.admin_token) as api_a:
                for job in jobs:
                    await wait_job(api_a, job["id"], step_running("resync"))
            a_running = False
            await leader.__aexit__(None, None, None)
            for m in machines:
                await internal_b.post("/api/v1/internal/points", {
                    "id": m.encode().hex().ljust(64, "0"), "machine": m,
                    "created": "2027-01-15T08:30:00.000000Z", "consistency": "crash"})
            for job in jobs:
                doc = await wait_job(api_b, job["id"], timeout=120)
                assert doc["state"] == "succeeded", doc
                assert doc["attempts"] == 2  # begun on a, finished on b
            await heartbeat(internal_b, "ps2")
            await pshealth.fail_over_once(b.services, up, 900.0)
            assert len(await moves()) == len(machines)  # still one each
            events = (await api_b.get("/api/v1/events", code=MOVED))["events"]
            assert sorted(e["target"] for e in events) == machines
            assert {m["name"]: m["process_server"] for m in
                    (await api_b.get("/api/v1/machines"))["machines"]} == dict.fromkeys(
                        machines, "ps2")
    finally:
        if a_running:
            await leader.__aexit__(None, None, None)


async def _machines_on_ps1(cs: ConfigServer, api: ApiClient, internal: ApiClient,
                           machines: list[str], t0: float) -> None:
    """ps1 and ps2 alive; ``machines`` on ps1, protected (as if enabled)."""
    for name in ("ps1", "ps2"):
        await heartbeat(internal, name)
    for m in machines:
        await api.post("/api/v1/machines", {
            "name": m, "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
            "os_version": "12", "disks": [{"name": "sda", "path": "/dev/sda"}],
            "process_server": "ps1"})
    async with cs.services.sessionmaker() as s:
        for m in machines:
            s.add(db.ReplicatedItem(machine=m, policy="default", state="protected",
                                    health="normal", health_errors=[], disk_progress={},
                                    created=t0, updated=t0))
        await s.commit()
