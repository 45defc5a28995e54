"""Invariants 7 and 9 on the wire: a broken connection resumes, it does not start over.

A real agent replicates through a real process server over mutual TLS, with an
asyncio TCP proxy between them that breaks the connection where a test wants it:
after so many bytes towards the server (a reset), by going silent both ways (a dead
peer), by pausing while the process server is killed and restarted, or by dropping
what the server sends (a lost ACK). Every time, the cycle is resumed on a new
connection, the point restores byte for byte, and the bytes that reached the server
show that what it already held was not sent again.

Also here: heartbeats keep a slow agent and a slow server alive; unfinished TLS
handshakes are capped; a fast agent cannot make the server buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from mobility.agent import Agent, CycleResult
from mobility.snapshot import Quiesced, Scripts
from procserver import db
from procserver.config import ProcServerConfig
from procserver.listener import RECV_CHUNK, RECV_HIGH_WATER
from procserver.receive import RUN_BYTES
from procserver.server import ProcServer
from tests.helpers import (
    Daemon,
    Pki,
    agent_config,
    make_agent,
    open_vault,
    proc_config,
    restore_all,
    running_procserver,
    sha256,
    write_toml,
)
from wire.protocol import HEADER, RemoteError

BS = 64 << 10
BLOCK_FRAME = HEADER.size + 10 + BS
TLS_SLACK = 32 << 10  # per connection: handshake, control frames, record overhead
PER_CUT = 2 * BLOCK_FRAME + (32 << 10)  # at most what one cut can cost: a frame and a record


def random_disk(path: Path, size: int, seed: int) -> None:
    """Incompressible, no zero blocks: every block is one BLOCK frame of a full cycle."""
    import random

    path.write_bytes(random.Random(seed).randbytes(size))


def frame_bytes(size: int) -> int:
    """Bytes of the BLOCK frames of a full cycle of a disk with no zero block."""
    whole, tail = divmod(size, BS)
    return whole * BLOCK_FRAME + (HEADER.size + 10 + tail if tail else 0)


@dataclasses.dataclass
class _Conn:
    quiet: bool = False  # stalled: nothing is forwarded either way
    drop_down: bool = False  # what the server sends is swallowed


class Proxy:
    """A TCP proxy between agents and a process server, with faults on demand.

    Counts the bytes it forwards each way (over every connection). Thresholds are in
    bytes forwarded towards the server: ``cuts`` reset the connection there; at
    ``stall_at`` the connection goes silent both ways, sockets left open; at
    ``pause_at`` forwarding stops and ``paused`` is set until ``reset_all``; once the
    connection that crosses ``drop_down_after`` has, nothing more reaches the agent on it.
    At ``closes`` the connection towards the server is closed cleanly (FIN) mid-stream
    instead of reset. Every chunk forwarded either way waits ``delay`` seconds first
    (a slow, long link).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = self.down = self.connections = 0
        self.cuts: list[int] = []
        self.closes: list[int] = []
        self.delay = 0.0
        self.stall_at: int | None = None
        self.pause_at: int | None = None
        self.drop_down_after: int | None = None
        self.paused = asyncio.Event()
        self.on_forward: Callable[[], None] | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.reset_all()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def reset_all(self) -> None:
        """Reset every open connection (both sides)."""
        for cw, sw in list(self._conns):
            cw.transport.abort()
            sw.transport.abort()
        self.paused.clear()
        self.pause_at = None

    def _next_event(self) -> tuple[int, str] | None:
        events = [(c, "cut") for c in self.cuts if c > self.up]
        events += [(c, "close") for c in self.closes if c > self.up]
        if self.stall_at is not None and self.stall_at > self.up:
            events.append((self.stall_at, "stall"))
        if self.pause_at is not None and self.pause_at > self.up:
            events.append((self.pause_at, "pause"))
        return min(events) if events else None

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # the server is down: the agent sees a reset, and retries
            cw.transport.abort()
            return
        pair = (cw, sw)
        self._conns.add(pair)
        conn = _Conn()
        pumps = {asyncio.create_task(self._up(cr, sw, conn)),
                 asyncio.create_task(self._down(sr, cw, conn))}
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            self._conns.discard(pair)
            cw.transport.abort()
            sw.transport.abort()

    async def _up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                  conn: _Conn) -> None:
        while data := await r.read(64 << 10):
            if self.delay:
                await asyncio.sleep(self.delay)  # the fault itself, not synchronisation
            while data:
                event = self._next_event()
                n = len(data) if event is None else min(len(data), event[0] - self.up)
                if conn.quiet:
                    await asyncio.Event().wait()  # silent until the connection is dropped
                w.write(data[:n])
                self.up += n
                data = data[n:]
                if self.drop_down_after is not None and self.up >= self.drop_down_after:
                    conn.drop_down, self.drop_down_after = True, None  # this one only
                await w.drain()
                if self.on_forward is not None:
                    self.on_forward()
                if event is not None and self.up >= event[0]:
                    if event[1] == "cut":
                        return
                    if event[1] == "close":
                        w.write_eof()  # the server reads a clean end in the middle of it all
                        await asyncio.Event().wait()  # until the server closes its side
                    if event[1] == "stall":
                        conn.quiet = True
                    else:
                        self.paused.set()
                        await asyncio.Event().wait()  # until reset_all drops the connection

    async def _down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    conn: _Conn) -> None:
        while data := await r.read(64 << 10):
            if self.delay:
                await asyncio.sleep(self.delay)
            if conn.quiet or conn.drop_down:
                continue  # swallowed: the agent never sees it
            w.write(data)
            self.down += len(data)
            await w.drain()


@contextlib.asynccontextmanager
async def proxied(ps: ProcServer) -> AsyncIterator[Proxy]:
    async with Proxy(ps.port) as proxy:
        yield proxy


async def restored_exactly(ps: ProcServer, tmp: Path, key: Path, r: CycleResult,
                           disk: Path) -> None:
    point_id = await ps.wait_point(r.cycle, timeout=120)
    vault = await open_vault(tmp / "vault", key)
    try:
        point = await vault.read_point(point_id)
        assert await restore_all(vault, point, tmp / "restore") == {"sda": sha256(disk)}
    finally:
        await vault.close()


def metric(ps: ProcServer, name: str, **labels: str) -> float:
    value = ps.metrics.registry.get_sample_value(f"siterecovery_procserver_{name}", labels)
    return value or 0.0


async def replicate(agent: Agent) -> CycleResult:
    try:
        return await agent.replicate_once()
    finally:
        agent.close()


# -- resume after resets ---------------------------------------------------------------------

async def test_cycle_resumes_after_resets_at_several_points(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    size = (24 << 20) + 12345  # and a short last block
    disk = tmp_path / "disk.img"
    random_disk(disk, size, seed=1)
    total = frame_bytes(size)
    async with running_procserver(proc_config(tmp_path, pki, url, key,
                                              segment_bytes=4 << 20)) as ps, \
            proxied(ps) as proxy:
        proxy.cuts = [total // 5, total // 2, total * 4 // 5]
        r = await replicate(make_agent(agent_config(tmp_path, pki, "web01", proxy.port,
                                                    {"sda": disk})))
        assert r.full and r.resumes == 3 and proxy.connections == 4
        assert metric(ps, "resumed_cycles_total") == 3
        # Each resume went on where the server's durable copy ended: what reached the
        # server is the cycle once, plus at most a frame and a TLS record per cut (a
        # restart from the beginning would have sent 20 % + 50 % + 80 % more).
        assert total <= proxy.up <= total + 4 * TLS_SLACK + 3 * PER_CUT
        assert r.blocks_sent == (size + BS - 1) // BS
        await restored_exactly(ps, tmp_path, key, r, disk)
        async with ps.sessionmaker() as s:
            states = (await s.execute(select(db.Cycle.state))).scalars().all()
        assert states == [db.UPLOADED]  # one cycle, resumed: not four


async def test_cycle_survives_a_slow_link_and_clean_closes_mid_frame(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """Latency on every chunk both ways, and the stream towards the server ended cleanly
    (FIN, not a reset) in the middle of a frame, twice: the server reads a truncated
    frame, keeps what was whole, and the agent resumes after it."""
    url, key = vault_at
    size = 12 << 20
    disk = tmp_path / "disk.img"
    random_disk(disk, size, seed=11)
    total = frame_bytes(size)
    async with running_procserver(proc_config(tmp_path, pki, url, key,
                                              segment_bytes=2 << 20)) as ps, \
            proxied(ps) as proxy:
        proxy.delay = 0.005
        proxy.closes = [total // 3 + BLOCK_FRAME // 2, total * 2 // 3 + 7]
        r = await replicate(make_agent(agent_config(tmp_path, pki, "slow01", proxy.port,
                                                    {"sda": disk})))
        assert r.full and r.resumes == 2 and proxy.connections == 3
        assert metric(ps, "resumed_cycles_total") == 2
        assert total <= proxy.up <= total + 3 * TLS_SLACK + 2 * PER_CUT
        await restored_exactly(ps, tmp_path, key, r, disk)


async def test_delta_cycle_resumes_and_spans_disks(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """Two disks, a delta cycle: the cuts land on the second disk's part and between."""
    url, key = vault_at
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    random_disk(a, 8 << 20, seed=2)
    random_disk(b, 8 << 20, seed=3)
    async with running_procserver(proc_config(tmp_path, pki, url, key)) as ps, \
            proxied(ps) as proxy:
        cfg = agent_config(tmp_path, pki, "db01", proxy.port, {"sda": a, "sdb": b})
        first = await replicate(make_agent(cfg))
        with open(a, "r+b") as f:  # change every other block of both disks
            for n in range(0, 128, 2):
                f.seek(n * BS)
                f.write(os.urandom(BS) if n % 4 else bytes(BS))
        with open(b, "r+b") as f:
            for n in range(1, 128, 2):
                f.seek(n * BS)
                f.write(os.urandom(BS))
        start = proxy.up
        delta = 128 * BLOCK_FRAME  # 64 changed blocks per disk; zeroed ones are smaller
        proxy.cuts = [start + delta // 3, start + delta * 3 // 4]
        r = await replicate(make_agent(cfg))
        assert not r.full and r.resumes == 2 and r.blocks_sent == 128
        assert proxy.up - start <= delta + 3 * TLS_SLACK + 2 * PER_CUT
        vault = await open_vault(tmp_path / "vault", key)
        try:
            for cyc, want in ((first.cycle, None), (r.cycle, {"sda": sha256(a)})):
                point = await vault.read_point(await ps.wait_point(cyc, timeout=120))
                got = await restore_all(vault, point, tmp_path / "restore")
                if want is not None:
                    assert got["sda"] == want["sda"] and got["sdb"] == sha256(b)
        finally:
            await vault.close()


async def test_lost_ack_is_answered_again_on_resume(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """END reached the server, its ACK never reached the agent: the agent resumes and is
    told the cycle is complete; nothing is sent twice and the point is there once."""
    url, key = vault_at
    d1, d2 = tmp_path / "m1.img", tmp_path / "m2.img"
    random_disk(d1, 4 << 20, seed=4)
    d2.write_bytes(d1.read_bytes())  # the same frames, so the same bytes on the wire
    cfg = proc_config(tmp_path, pki, url, key, idle_timeout_seconds=2.0)
    async with running_procserver(cfg) as ps, proxied(ps) as proxy:
        clean = await replicate(make_agent(agent_config(tmp_path, pki, "m1", proxy.port,
                                                        {"sda": d1})))
        assert clean.resumes == 0
        one_cycle = proxy.up
        # Drop what the server sends once the agent's END is on its way (PROGRESS, the
        # answer to SYNC, came before the agent even sent END).
        proxy.drop_down_after = one_cycle + one_cycle - 100
        r = await replicate(make_agent(agent_config(tmp_path, pki, "m2", proxy.port,
                                                    {"sda": d2})))
        assert r.resumes == 1
        assert proxy.up - one_cycle <= one_cycle + TLS_SLACK  # only a RESUME more
        await restored_exactly(ps, tmp_path, key, r, d2)
        async with ps.sessionmaker() as s:
            rows = (await s.execute(select(db.Cycle.machine, db.Cycle.state))).all()
        assert sorted(tuple(row) for row in rows) == [("m1", db.UPLOADED), ("m2", db.UPLOADED)]


# -- a dead peer: silence, not a reset ----------------------------------------------------------

async def test_silent_connection_is_dropped_by_both_sides_and_resumed(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """The path goes dead without a reset: no heartbeat gets through, so the agent gives
    the connection up after the idle timeout and resumes on a new one (taking over the
    cycle from the server's session if that has not timed out yet)."""
    url, key = vault_at
    size = 8 << 20
    disk = tmp_path / "disk.img"
    random_disk(disk, size, seed=5)
    cfg = proc_config(tmp_path, pki, url, key, idle_timeout_seconds=2.0)
    async with running_procserver(cfg) as ps, proxied(ps) as proxy:
        proxy.stall_at = frame_bytes(size) // 2
        r = await replicate(make_agent(agent_config(tmp_path, pki, "web01", proxy.port,
                                                    {"sda": disk})))
        assert r.resumes >= 1
        assert proxy.up <= frame_bytes(size) + (r.resumes + 1) * (TLS_SLACK + PER_CUT)
        await restored_exactly(ps, tmp_path, key, r, disk)


# -- resume windows, giving up, starting over ------------------------------------------------

async def test_cycle_past_its_resume_window_is_refused_and_the_next_starts_over(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    disk = tmp_path / "disk.img"
    random_disk(disk, 4 << 20, seed=6)
    cfg = proc_config(tmp_path, pki, url, key, resume_window_seconds=0.0)
    async with running_procserver(cfg) as ps, proxied(ps) as proxy:
        proxy.cuts = [frame_bytes(4 << 20) // 2]
        acfg = agent_config(tmp_path, pki, "web01", proxy.port, {"sda": disk})
        with pytest.raises(RemoteError) as e:
            await replicate(make_agent(acfg))
        assert e.value.code == "cannot_resume"
        r = await replicate(make_agent(acfg))  # the next cycle: from the start, in full
        assert r.full and r.resumes == 0
        await restored_exactly(ps, tmp_path, key, r, disk)
        async with ps.sessionmaker() as s:
            states = (await s.execute(select(db.Cycle.state).order_by(db.Cycle.seq))
                      ).scalars().all()
        assert states == [db.ABORTED, db.UPLOADED]


async def test_new_cycle_supersedes_a_suspended_one(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """An agent that gave up on a cycle (here: it does not try to resume) starts a new one;
    the suspended cycle is dropped at once instead of holding up the machine's uploads."""
    url, key = vault_at
    disk = tmp_path / "disk.img"
    random_disk(disk, 4 << 20, seed=7)
    async with running_procserver(proc_config(tmp_path, pki, url, key)) as ps, \
            proxied(ps) as proxy:
        proxy.cuts = [frame_bytes(4 << 20) // 2]
        acfg = agent_config(tmp_path, pki, "web01", proxy.port, {"sda": disk},
                            resume_timeout_seconds=0.0)
        with pytest.raises((ConnectionError, OSError)):
            await replicate(make_agent(acfg))
        async with asyncio.timeout(30), ps.cycles.changed:
            await ps.cycles.changed.wait_for(lambda: ps.cycles.suspended() == 1)
        r = await replicate(make_agent(acfg))
        assert r.full and r.resumes == 0
        assert metric(ps, "suspended_cycles") == 0
        await restored_exactly(ps, tmp_path, key, r, disk)
        async with ps.sessionmaker() as s:
            states = (await s.execute(select(db.Cycle.state).order_by(db.Cycle.seq))
                      ).scalars().all()
        assert states == [db.ABORTED, db.UPLOADED]
        assert not list((ps.cache_dir / "web01").glob("*/*.hrl"))


# -- resume across a process-server crash -------------------------------------------------------

def _proc_toml(tmp: Path, cfg: ProcServerConfig) -> Path:
    doc = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return write_toml(tmp / "procserver.toml", doc)


async def _restart_mid_cycle(tmp: Path, pki: Pki, vault_at: tuple[str, Path], *,
                            pause_at: Callable[[int], int], kill: bool
                            ) -> tuple[CycleResult, int, int]:
    """Replicate through a proxy; when ``pause_at(n)`` bytes of the cycle went to the
    process server (``n``: what a whole cycle of the same disk sends, measured first with
    machine m0), stop it (kill -9, or SIGTERM), start it again, and let the agent
    resume. Returns the cycle, the blocks the new server said it held, and the bytes the
    new server received."""
    url, key = vault_at
    size = 16 << 20
    disk, twin = tmp / "m1.img", tmp / "m0.img"
    random_disk(disk, size, seed=8)
    twin.write_bytes(disk.read_bytes())
    conf = _proc_toml(tmp, proc_config(tmp, pki, url, key, segment_bytes=1 << 20))
    ps = Daemon(["procserver", "run", "--config", str(conf)], "procserver_started")
    ps2: Daemon | None = None
    port = int(str((await ps.start())["port"]))
    try:
        async with Proxy(port) as proxy:
            await replicate(make_agent(agent_config(tmp, pki, "m0", proxy.port,
                                                    {"sda": twin})))
            one_cycle = proxy.up
            await ps.wait_events("point_uploaded", 1)  # the server is idle again
            proxy.pause_at = one_cycle + pause_at(one_cycle)
            agent = make_agent(agent_config(tmp, pki, "m1", proxy.port, {"sda": disk}))
            cycle = asyncio.create_task(replicate(agent))
            async with asyncio.timeout(60):
                await proxy.paused.wait()
            if kill:
                await ps.kill9()
            else:
                assert await ps.stop() == 0  # SIGTERM: the session is cancelled, sealed
            ps2 = Daemon(["procserver", "run", "--config", str(conf)], "procserver_started")
            proxy.target_port = int(str((await ps2.start())["port"]))
            assert len(ps2.events("cycle_resumable")) == 1
            before = proxy.up
            proxy.reset_all()  # the agent's connection to the old server breaks now
            async with asyncio.timeout(120):
                r = await cycle
            while not any(e.get("cycle") == r.cycle for e in ps2.events("point_uploaded")):
                await ps2.wait_events("point_uploaded", len(ps2.events("point_uploaded")) + 1)
    finally:
        if ps.proc is not None and ps.proc.returncode is None:
            await ps.kill9()
        if ps2 is not None:
            assert await ps2.stop() == 0
    assert r.resumes == 1
    resumed = ps2.events("cycle_resumed")
    assert [e["cycle"] for e in resumed] == [r.cycle]
    durable = resumed[0]["blocks"]
    assert isinstance(durable, int)
    vault = await open_vault(tmp / "vault", key)
    try:
        points = await vault.list_points("m1")
        assert [p.cycle for p in points] == [r.cycle]
        assert await restore_all(vault, points[0], tmp / "restore") == {"sda": sha256(disk)}
    finally:
        await vault.close()
    return r, durable, proxy.up - before


async def test_cycle_resumes_after_the_process_server_is_killed_mid_cycle(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """kill -9 in the middle of a cycle: on restart the process server keeps the cycle's
    recorded segments and deletes the unrecorded tail; the agent (still holding its
    snapshot) resumes after the last recorded block, and sends the new server the blocks
    after it and nothing else."""
    r, durable, new_bytes = await _restart_mid_cycle(
        tmp_path, pki, vault_at, pause_at=lambda total: total * 3 // 4, kill=True)
    assert 0 <= durable < r.blocks_sent
    assert new_bytes <= (r.blocks_sent - durable) * BLOCK_FRAME + TLS_SLACK


async def test_cycle_resumes_after_the_process_server_is_killed_before_the_ack(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """kill -9 while END is on its way: SYNC had made every block durable, so after the
    restart only END is sent again."""
    r, durable, new_bytes = await _restart_mid_cycle(
        tmp_path, pki, vault_at, pause_at=lambda total: total - 150, kill=True)
    assert durable == r.blocks_sent
    assert new_bytes <= TLS_SLACK


async def test_cycle_resumes_after_the_process_server_restarts_mid_cycle(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """A clean restart (SIGTERM) in the middle of a cycle: the session is cancelled at
    shutdown and seals every frame that arrived whole, so the new server holds them all
    and the agent sends only what never reached the old one."""
    r, durable, new_bytes = await _restart_mid_cycle(
        tmp_path, pki, vault_at, pause_at=lambda total: total // 2, kill=False)
    # Half the frames reached the old server, less one cut by the pause and TLS overhead.
    assert durable >= r.blocks_sent // 2 - 2
    assert new_bytes <= (r.blocks_sent - durable) * BLOCK_FRAME + TLS_SLACK


# -- heartbeats: slow is not dead -----------------------------------------------------------

def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_heartbeats_keep_a_slow_agent_connected(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """The agent's pre-script takes three idle timeouts between HELLO and BEGIN; its
    heartbeats keep the session alive, so the cycle goes through on one connection."""
    url, key = vault_at
    disk = tmp_path / "disk.img"
    random_disk(disk, 2 << 20, seed=9)
    cfg = proc_config(tmp_path, pki, url, key, idle_timeout_seconds=1.0)
    async with running_procserver(cfg) as ps:
        slow = Scripts(_script(tmp_path / "pre", "sleep 3"), _script(tmp_path / "post", "true"),
                       30, Quiesced())
        agent = Agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}),
                      provider=slow)
        r = await replicate(agent)
        assert (r.consistency, r.resumes) == ("app", 0)
        assert metric(ps, "heartbeats_received_total") > 0
        assert metric(ps, "rejected_sessions_total", reason="timeout") == 0
        await restored_exactly(ps, tmp_path, key, r, disk)


# -- flow control: a fast agent, a slow cache writer --------------------------------------------

async def test_fast_agent_is_held_back_by_a_slow_cache_writer(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """Cache writes are limited and the receive buffer is 1 MiB: the server holds a
    bounded amount in memory whatever the agent sends, the agent is held back by TCP, and
    heartbeats from the busy server keep the agent from giving it up."""
    url, key = vault_at
    receive_buffer = 1 << 20
    memory_bound = receive_buffer + RUN_BYTES + BLOCK_FRAME + RECV_HIGH_WATER + 2 * RECV_CHUNK
    # What may lie between the agent and the cache: the server's bounded buffers and the
    # kernel's socket buffers, whose ceiling is the machine's (tcp_rmem's is 6 MiB on
    # some kernels, 32 MiB on others). The disk is more than twice that, so a server that
    # buffered without bound would show as a disk ahead, whatever the machine.
    ahead_bound = memory_bound + _socket_buffers() + TLS_SLACK
    size = max(40 << 20, -(-(2 * ahead_bound + (8 << 20)) // BS) * BS)
    disk = tmp_path / "disk.img"
    random_disk(disk, size, seed=10)
    # The cycle takes 5 s (the disk at a fifth of it a second), the agent gives a silent
    # server up after 2 s: only the busy server's heartbeats keep it. (1 s was too short a
    # margin for an event loop stalled by a loaded machine.)
    cfg = proc_config(tmp_path, pki, url, key, idle_timeout_seconds=2.0,
                      receive_buffer_bytes=receive_buffer, receive_bytes_per_second=size // 5)
    async with running_procserver(cfg) as ps, proxied(ps) as proxy:
        held: list[int] = []
        ahead: list[int] = []

        def sample() -> None:  # at every forward towards the server
            held.append(ps.buffers.buffered)
            ahead.append(proxy.up - ps.buffers.written)

        proxy.on_forward = sample
        r = await replicate(make_agent(agent_config(tmp_path, pki, "web01", proxy.port,
                                                    {"sda": disk})))
        assert r.resumes == 0  # slow, never taken for dead
        assert metric(ps, "heartbeats_sent_total") > 0
        assert max(held) <= memory_bound
        assert max(ahead) <= ahead_bound
        assert max(ahead) < size // 2
        await restored_exactly(ps, tmp_path, key, r, disk)


def _socket_buffers() -> int:
    """The most the kernel may buffer on one loopback hop (send and receive side)."""
    def high(name: str) -> int:
        return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
    return high("tcp_wmem") + high("tcp_rmem")


# -- unfinished TLS handshakes are capped -------------------------------------------------------

async def _raw_connections(port: int, source: str, n: int) -> list[tuple[
        asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` TCP connections from ``source`` that never send a byte (no ClientHello)."""
    return [await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            for _ in range(n)]


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read(1) == b""
    except ConnectionError:
        return True


async def _wait_closed_count(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                             count: int) -> set[int]:
    """Wait until ``count`` of ``conns`` are closed by the server; return their indexes."""
    reads = {asyncio.create_task(_closed(r)): i for i, (r, _w) in enumerate(conns)}
    done_idx: set[int] = set()
    try:
        async with asyncio.timeout(30):
            while len(done_idx) < count:
                done, _ = await asyncio.wait(set(reads) - {t for t, i in reads.items()
                                                           if i in done_idx},
                                             return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    assert t.result()
                    done_idx.add(reads[t])
    finally:
        for t in reads:
            t.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
    return done_idx


async def test_unfinished_handshakes_are_capped_per_address_and_in_all(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    disk = tmp_path / "disk.img"
    random_disk(disk, 2 << 20, seed=11)
    cfg = proc_config(tmp_path, pki, url, key, max_handshakes=8, max_handshakes_per_host=4,
                      handshake_timeout_seconds=3.0)
    async with running_procserver(cfg) as ps:
        flood = await _raw_connections(ps.port, "127.0.0.2", 20)
        try:
            # Past the per-address cap: closed at once, before any TLS work.
            await _wait_closed_count(flood, 16)
            assert metric(ps, "rejected_handshakes_total", reason="busy") == 16
            assert metric(ps, "tls_handshakes") == 4
            # ... and the four still waiting do not keep a machine from another address out.
            r = await replicate(make_agent(agent_config(tmp_path, pki, "web01", ps.port,
                                                        {"sda": disk})))
            await restored_exactly(ps, tmp_path, key, r, disk)
            # The handshake timeout closes the four that never said a word.
            await _wait_closed_count(flood, 20)
            assert metric(ps, "rejected_handshakes_total", reason="timeout") == 4
            assert metric(ps, "tls_handshakes") == 0
            # The cap in all: four addresses, three each, cap 8: four are closed at once.
            many = [c for i in range(3, 7)
                    for c in await _raw_connections(ps.port, f"127.0.0.{i}", 3)]
            flood += many
            await _wait_closed_count(many, 4)
            assert metric(ps, "rejected_handshakes_total", reason="busy") == 20
            assert metric(ps, "tls_handshakes") == 8
        finally:
            for _r, w in flood:
                w.transport.abort()
