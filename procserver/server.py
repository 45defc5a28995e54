"""``ProcServer``: the process-server daemon (TLS listener, uploader, reporter, metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import delete, func, select

from procserver import db
from procserver.cache import (
    RateLimit,
    SealedSegment,
    cache_usage,
    drop_unsealed,
    remove_cycle_dir,
)
from procserver.config import ProcServerConfig
from procserver.metrics import ProcMetrics
from procserver.policies import Policies
from procserver.reporter import Reporter
from procserver.session import ABORTED, OPEN, OpenCycle, ReceiveProgress, Session
from procserver.trust import TrustList
from procserver.uploader import Uploader
from procserver.wire import MAX_FRAME, FrameStream, ProtocolError, error_frame
from vault.instrument import StoreMetrics
from vault.keyslots import KeyMaterial, read_keyfile
from vault.open import open_store
from vault.repo import Vault
from vault.store import BlobStore
from vault.throttle import ThrottleStore, TokenBucket

log = structlog.get_logger("procserver")


def server_ssl_context(cfg: ProcServerConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cfg.tls_ca)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# Receive buffering per connection: reading pauses once this much waits to be parsed.
RECV_CHUNK = 256 << 10
RECV_HIGH_WATER = 512 << 10
# Received bytes handed to the cache writer threads and not yet written: at most
# receive_buffer_bytes across sessions, shared among the sessions receiving (each may use
# at least SINK_MIN), so a burst rides out a briefly slow writer in bounded memory.
SINK_MIN = 1 << 20


# The event loop shares the GIL with CPU-bound threads (sealing, cache writing). With
# CPython's default 5 ms switch interval, every return of the loop from a system call can
# wait that long for the GIL behind them (the convoy effect); 1 ms keeps the loop, and so
# the network, moving. Set process-wide, only ever lowered.
SWITCH_INTERVAL = 0.001


def responsive_gil() -> None:
    if sys.getswitchinterval() > SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)


def peer_machine(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> str | None:
    cert = writer.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class ProcServer:
    def __init__(self, cfg: ProcServerConfig) -> None:
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir)
        self.cache_dir = self.data_dir / "cache"
        self.metrics = ProcMetrics()
        self.max_frame = MAX_FRAME
        self.executor = ThreadPoolExecutor(cfg.upload_threads, thread_name_prefix="seal")
        self.uploader = Uploader(self)
        self.reporter = Reporter(self)
        self.trust = TrustList(cfg)  # agent certificates the configuration server refuses
        self.reporter.on_refresh.append(self.trust.wake)
        self.policies = Policies(self)  # pulled policies, retention, scrape-time metrics
        self._cache_bytes = 0
        self._cycle_bytes: dict[int, int] = {}
        self._space = asyncio.Condition()
        self._sessions = asyncio.Semaphore(cfg.max_sessions)
        self._tasks: list[asyncio.Task[None]] = []
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._handshakes = 0  # TCP connections accepted whose TLS handshake is not done
        self._handshakes_by_host: Counter[str] = Counter()
        self._ssl: ssl.SSLContext | None = None
        # Cycles being received (and resumable ones while suspended), by cycle id.
        self.open_cycles: dict[str, OpenCycle] = {}
        self.rate_limit = RateLimit(cfg.receive_bytes_per_second) \
            if cfg.receive_bytes_per_second > 0 else None
        self.heartbeat_seconds = max(0.05, cfg.idle_timeout_seconds / 4)
        self._queued = self._queued_total = 0
        self._streams: set[FrameStream] = set()
        self.receiving = 0  # sessions receiving a cycle now
        self.metrics.suspended_cycles.set_function(self.suspended)
        self.metrics.receive_buffer_bytes.set_function(lambda: self.receive_buffered)
        self._listeners: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self.points_changed = asyncio.Condition()
        self.cycles_changed = asyncio.Condition()  # a cycle was suspended or aborted
        self._runner: web.AppRunner | None = None
        self.port = cfg.listen_port
        self.metrics_port = cfg.metrics_port

    async def start(self) -> None:
        responsive_gil()
        # The vault and its key first: a wrong key or URL must leave nothing behind.
        km = KeyMaterial(keyfile=read_keyfile(self.cfg.vault_key_file))
        store: BlobStore = open_store(self.cfg.vault_url, StoreMetrics(self.metrics.registry))
        schedule = self.cfg.upload_schedule()
        if not schedule.unlimited:  # pace uploads; the cache absorbs the difference
            store = ThrottleStore(store, TokenBucket(schedule))
        self.vault = await Vault.open(store, km)
        try:
            self.index = await self.vault.load_index()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.engine, self.sessionmaker = await db.open_db(
                str(self.data_dir / "procserver.db"))
        except BaseException:
            await self.vault.close()
            raise
        await self._recover()
        self._ssl = server_ssl_context(self.cfg)
        # Accepting is ours, the TLS handshake is started per connection: connections
        # that have not finished it are counted and capped (max_handshakes) before any
        # TLS work is done for them.
        self._listeners = await asyncio.to_thread(
            _listen, self.cfg.listen_host, self.cfg.listen_port)
        self.port = self._listeners[0].getsockname()[1]
        self._acceptors = [asyncio.create_task(self._accept_loop(sock), name="accept")
                           for sock in self._listeners]
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.metrics_host, self.cfg.metrics_port)
        await site.start()
        self.metrics_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._tasks = [asyncio.create_task(self.uploader.run(), name="uploader"),
                       asyncio.create_task(self.reporter.run(), name="reporter"),
                       asyncio.create_task(self.trust.run(), name="trust"),
                       asyncio.create_task(self.policies.run(), name="policies")]
        log.info("procserver_started", port=self.port, metrics_port=self.metrics_port,
                 vault=self.vault.store.url, blocks_indexed=len(self.index))

    async def _recover(self) -> None:
        """Drop cycles that were never acknowledged; account for the ones still cached.

        Cycles still receiving when we died were never acked: their data goes, unless
        the cycle is resumable (its agent speaks ``resume``) and is its machine's newest:
        then its recorded segments stay, the unrecorded tail is deleted, and the agent
        may resume it within ``resume_window_seconds``. Cache folders of no complete or
        resumable cycle (left by a crash between a database commit and the folder's
        removal) are removed too.
        """
        async with self.sessionmaker() as s:
            rows = (await s.execute(select(db.Cycle).where(db.Cycle.state == db.RECEIVING)
                                    .order_by(db.Cycle.seq))).scalars().all()
            progress = {p.cycle_seq: p for p in
                        (await s.execute(select(ReceiveProgress))).scalars().all()}
            newest = {m: seq for m, seq in (await s.execute(
                select(db.Cycle.machine, func.max(db.Cycle.seq)).group_by(db.Cycle.machine)
            )).all()}
            dropped, kept = [], []
            for row in rows:
                p = progress.get(row.seq)
                cycle_dir = self.cache_dir / row.machine / row.id
                if p is not None and newest.get(row.machine) == row.seq and \
                        (p.frames == 0 or cycle_dir.is_dir()):
                    kept.append((row, p))
                else:
                    row.state = db.ABORTED
                    dropped.append(row)
            await s.execute(delete(ReceiveProgress).where(
                ReceiveProgress.cycle_seq.in_([r.seq for r in dropped])))
            await s.commit()
            live = (await s.execute(select(db.Cycle).where(db.Cycle.state == db.COMPLETE))
                    ).scalars().all()
        if dropped:
            log.warning("unacknowledged_cycles_dropped", count=len(dropped))
        keep = {self.cache_dir / c.machine / c.id: c.seq for c in live}
        for row, p in kept:
            last = None if p.last_disk is None or p.last_block is None \
                else (p.last_disk, p.last_block)
            oc = OpenCycle(row.seq, row.id, row.machine, json.loads(row.begin_doc), True,
                           self.cache_dir / row.machine / row.id, frames=p.frames, last=last,
                           floor=last, next_segment=p.next_segment)
            await asyncio.to_thread(drop_unsealed, oc.cycle_dir, p.next_segment)
            keep[oc.cycle_dir] = oc.seq
            self.open_cycles[oc.id] = oc
            oc.suspended_at = time.monotonic()
            self._start_resume_window(oc)
            log.info("cycle_resumable", machine=row.machine, cycle=row.id, blocks=p.frames,
                     position=oc.position())
        for machine_dir in await asyncio.to_thread(_subdirs, self.cache_dir):
            for cycle_dir in await asyncio.to_thread(_subdirs, machine_dir):
                if cycle_dir in keep:
                    size = await asyncio.to_thread(cache_usage, cycle_dir)
                    self._cycle_bytes[keep[cycle_dir]] = size
                    self._cache_bytes += size
                else:
                    await asyncio.to_thread(remove_cycle_dir, cycle_dir)
        self.metrics.cache_bytes.set(self._cache_bytes)

    async def stop(self, grace: float = 5.0) -> None:
        for t in self._acceptors:
            t.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for sock in self._listeners:
            sock.close()
        for oc in self.open_cycles.values():
            if oc.expiry is not None:
                oc.expiry.cancel()
                oc.expiry = None
        if self._conn_tasks:
            _done, pending = await asyncio.wait(self._conn_tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("sessions_cancelled_at_shutdown", count=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.vault.close()
        await self.engine.dispose()
        self.executor.shutdown(wait=True)
        log.info("procserver_stopped")

    # -- cache accounting: backpressure instead of unbounded growth -------------
    async def reserve_cache(self, cycle_seq: int, n: int, wait: bool = True) -> None:
        """Account ``n`` cache bytes to a cycle; wait (backpressure) while over quota.

        ``wait=False`` only when a session seals what already arrived before it ends:
        the quota may then be exceeded by that much."""
        if wait and self._cache_bytes + n > self.cfg.cache_quota_bytes:
            log.warning("cache_full_backpressure", cache_bytes=self._cache_bytes)
            async with self._space:
                await self._space.wait_for(
                    lambda: self._cache_bytes + n <= self.cfg.cache_quota_bytes)
        self._cache_bytes += n
        self._cycle_bytes[cycle_seq] = self._cycle_bytes.get(cycle_seq, 0) + n
        self.metrics.cache_bytes.set(self._cache_bytes)

    def release_cache(self, cycle_seq: int, n: int | None = None) -> None:
        """Give back ``n`` of a cycle's cache bytes (all that remain when ``None``)."""
        held = self._cycle_bytes.get(cycle_seq, 0)
        freed = held if n is None else min(n, held)
        if n is None or freed == held:
            self._cycle_bytes.pop(cycle_seq, None)
        else:
            self._cycle_bytes[cycle_seq] = held - freed
        self._cache_bytes -= freed
        self.metrics.cache_bytes.set(self._cache_bytes)
        if freed:
            t = asyncio.get_running_loop().create_task(self._notify_space())
            self._conn_tasks.add(t)
            t.add_done_callback(self._conn_tasks.discard)

    async def _notify_space(self) -> None:
        async with self._space:
            self._space.notify_all()

    # -- cycles being received: durable progress, suspend, resume window ---------
    def note_queued(self, n: int) -> None:
        """Bytes handed to the cache writers (> 0) or written or dropped by them (< 0)."""
        self._queued += n
        if n > 0:
            self._queued_total += n

    @property
    def receive_buffered(self) -> int:
        """Bytes received and held in memory: not yet parsed, or not yet written."""
        return self._queued + sum(s.buffered for s in self._streams)

    @property
    def cache_written(self) -> int:
        """Frame bytes written to HRL segments since start (sealed or not)."""
        return self._queued_total - self._queued

    def sink_budget(self) -> int:
        """How much one receiving session may have queued for its cache writer."""
        return max(SINK_MIN, self.cfg.receive_buffer_bytes // max(1, self.receiving))

    async def record_segments(self, oc: OpenCycle, segs: list[SealedSegment]) -> None:
        """Segments of ``oc`` are fsynced: their rows and the cycle's progress, atomically."""
        async with self.sessionmaker() as s:
            for seg in segs:
                s.add(db.Segment(cycle_seq=oc.seq, seq=seg.number, path=str(seg.path),
                                 size=seg.size))
            if oc.resumable:
                p = await s.get(ReceiveProgress, oc.seq)
                if p is not None:
                    last = segs[-1]
                    p.frames, p.next_segment = last.frames, last.number + 1
                    p.last_disk, p.last_block = last.last if last.last else (None, None)
            await s.commit()
        self.uploader.wake()

    def suspended(self) -> int:
        return sum(1 for oc in self.open_cycles.values()
                   if oc.suspended_at is not None and oc.state == OPEN)

    async def suspend(self, oc: OpenCycle, reason: str) -> None:
        """A resumable cycle's session ended without END; what arrived is recorded."""
        async with self.sessionmaker() as s:
            newest = (await s.execute(select(func.max(db.Cycle.seq)).where(
                db.Cycle.machine == oc.machine))).scalar_one()
        if newest is not None and newest > oc.seq:  # its agent has moved on already
            await self.abort_cycle(oc, "superseded")
            return
        oc.suspended_at = time.monotonic()
        self._start_resume_window(oc)
        async with self.cycles_changed:
            self.cycles_changed.notify_all()
        log.info("cycle_suspended", machine=oc.machine, cycle=oc.id, blocks=oc.frames,
                 position=oc.position(), reason=reason,
                 resume_window_seconds=self.cfg.resume_window_seconds)

    def _start_resume_window(self, oc: OpenCycle) -> None:
        if oc.expiry is not None:
            oc.expiry.cancel()
        oc.expiry = asyncio.get_running_loop().call_later(
            self.cfg.resume_window_seconds, self._expire, oc)

    def _expire(self, oc: OpenCycle) -> None:
        oc.expiry = None
        if oc.state == OPEN and oc.owner is None and not oc.lock.locked():
            self._background(self.abort_cycle(oc, "resume window passed"))

    def _background(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._conn_tasks.add(t)
        t.add_done_callback(self._conn_tasks.discard)

    async def supersede(self, machine: str, new_seq: int) -> None:
        """``machine`` began cycle ``new_seq``: its suspended cycles will not be resumed."""
        for oc in list(self.open_cycles.values()):
            if oc.machine == machine and oc.seq < new_seq and oc.state == OPEN and \
                    oc.owner is None and not oc.lock.locked():
                await self.abort_cycle(oc, "superseded")

    async def abort_cycle(self, oc: OpenCycle, reason: str = "") -> None:
        """Drop a cycle that was never acknowledged: row aborted, cache deleted."""
        if oc.state != OPEN:
            return
        oc.state = ABORTED
        self.open_cycles.pop(oc.id, None)
        if oc.expiry is not None:
            oc.expiry.cancel()
            oc.expiry = None
        try:
            await self._mark_aborted(oc.seq)
        except Exception:
            # The database may sit on the cache's full disk: free the cycle's space and
            # try once more. (A cycle left `receiving` without its folder is dropped at
            # the next start.)
            await asyncio.to_thread(remove_cycle_dir, oc.cycle_dir)
            self.release_cache(oc.seq)
            await self._mark_aborted(oc.seq)
        await asyncio.to_thread(remove_cycle_dir, oc.cycle_dir)
        self.release_cache(oc.seq)
        self.uploader.wake()
        async with self.cycles_changed:
            self.cycles_changed.notify_all()
        log.warning("cycle_aborted", machine=oc.machine, cycle=oc.id, cycle_seq=oc.seq,
                    **({"reason": reason} if reason else {}))

    async def _mark_aborted(self, seq: int) -> None:
        async with self.sessionmaker() as s:
            row = await s.get_one(db.Cycle, seq)
            row.state = db.ABORTED
            await s.execute(delete(ReceiveProgress).where(ReceiveProgress.cycle_seq == seq))
            await s.execute(delete(db.Segment).where(db.Segment.cycle_seq == seq))
            await s.commit()

    # -- connections ---------------------------------------------------------------
    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as e:  # EMFILE and friends: do not spin
                log.warning("accept_failed", error=str(e))
                await asyncio.sleep(0.1)
                continue
            host = str(addr[0]) if isinstance(addr, tuple) and addr else "?"
            if self._handshakes >= cfg.max_handshakes or \
                    self._handshakes_by_host[host] >= cfg.max_handshakes_per_host:
                self.metrics.rejected_handshakes.labels("busy").inc()
                sock.close()
                continue
            self._handshakes += 1
            self._handshakes_by_host[host] += 1
            self.metrics.handshakes.set(self._handshakes)
            self._background(self._connection(sock, host))

    async def _connection(self, sock: socket.socket, host: str) -> None:
        timeout = self.cfg.handshake_timeout_seconds
        transport: asyncio.BaseTransport | None = None
        stream = FrameStream(chunk=RECV_CHUNK, high_water=RECV_HIGH_WATER,
                             max_frame=self.max_frame)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                # (uvloop returns its TLS protocol as the second item, not ours)
                transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: stream, sock, ssl=self._ssl, ssl_handshake_timeout=timeout + 1)
        except TimeoutError:
            self.metrics.rejected_handshakes.labels("timeout").inc()
        except (OSError, ssl.SSLError, ConnectionError):
            self.metrics.rejected_handshakes.labels("failed").inc()
        finally:
            self._handshakes -= 1
            self._handshakes_by_host[host] -= 1
            if self._handshakes_by_host[host] <= 0:
                del self._handshakes_by_host[host]
            self.metrics.handshakes.set(self._handshakes)
        if transport is None:
            with contextlib.suppress(OSError):
                sock.close()
            return
        self._streams.add(stream)
        try:
            await self._handle(stream, cast(asyncio.Transport, transport))
        finally:
            self._streams.discard(stream)

    async def _handle(self, stream: FrameStream, transport: asyncio.Transport) -> None:
        machine = peer_machine(transport)
        try:
            if machine is None:  # cannot happen with CERT_REQUIRED, kept as a guard
                return
            if self._sessions.locked():
                self.metrics.rejected.labels("busy").inc()
                with contextlib.suppress(ConnectionError, TimeoutError):
                    stream.write(error_frame("busy", "too many sessions", "retry later"))
                    await asyncio.wait_for(stream.drain(), 5)
                return
            async with self._sessions:
                self.metrics.sessions.inc()
                session = Session(self, stream, machine,
                                  str(transport.get_extra_info("peername")))
                try:
                    await session.run()
                except ProtocolError as e:
                    self.metrics.rejected.labels(e.code).inc()
                    session.log.warning("session_rejected", code=e.code, error=str(e))
                    await self._refuse(stream, e.code, str(e))
                except (ConnectionError, ssl.SSLError, TimeoutError) as e:
                    session.log.info("session_lost", error=str(e) or type(e).__name__)
                except Exception as e:  # a bug or a failing database: end this session only
                    self.metrics.rejected.labels("internal_error").inc()
                    session.log.error("session_failed", error=str(e) or type(e).__name__,
                                      error_type=type(e).__name__)
                    await self._refuse(stream, "internal_error",
                                       f"the process server failed: {type(e).__name__}: {e}")
                finally:
                    self.metrics.sessions.dec()
        finally:
            transport.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.wait_closed(), 5)

    async def _refuse(self, stream: FrameStream, code: str, message: str) -> None:
        """Send ERROR, then let the peer read it before the connection closes."""
        with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
            stream.write(error_frame(code, message))
            await asyncio.wait_for(stream.drain(), 5)
            await stream.linger()

    async def wait_point(self, cycle: str, timeout: float = 300.0) -> str:
        """Wait until the acknowledged ``cycle`` is a whole point in the vault; return its id."""
        async with asyncio.timeout(timeout), self.points_changed:
            while True:
                async with self.sessionmaker() as s:
                    row = (await s.execute(select(db.Cycle).where(db.Cycle.id == cycle))
                           ).scalar_one_or_none()
                if row is not None and row.point_id is not None:
                    return row.point_id
                if row is not None and row.state == db.ABORTED:
                    raise RuntimeError(f"cycle {cycle} was aborted")
                await self.points_changed.wait()

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    async def _metrics(self, _req: web.Request) -> web.Response:
        await self.policies.refresh_metrics()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _req: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "cache_bytes": self._cache_bytes})


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host`` (every address it resolves to) and ``port``."""
    out: list[socket.socket] = []
    try:
        for family, type_, proto, _name, addr in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            if out and port == 0:
                break  # one ephemeral port cannot be shared across addresses
            sock = socket.socket(family, type_, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


def _subdirs(p: Path) -> list[Path]:
    return [c for c in p.iterdir() if c.is_dir()] if p.is_dir() else []
