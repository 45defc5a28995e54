"""``ProcServer``: the process-server daemon (TLS listener, uploader, reporter, metrics).

The cycles it receives are kept in ``cycles.CycleBook`` and their cache space in
``cachespace.CacheSpace``; the sessions themselves are ``session.Session``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import select

from common.pacing import Schedule, TokenBucket
from procserver import db
from procserver.cachespace import CacheSpace
from procserver.config import ProcServerConfig
from procserver.cycles import CycleBook
from procserver.framestream import FrameStream
from procserver.metrics import ProcMetrics
from procserver.policies import Policies
from procserver.reporter import Reporter
from procserver.scrape import refresh_metrics
from procserver.session import Session
from procserver.trust import TrustList
from procserver.uploader import Uploader
from vault.errors import TransientStoreError
from vault.index import Index
from vault.instrument import StoreMetrics
from vault.keyslots import KeyMaterial, read_keyfile
from vault.open import open_store
from vault.repo import Vault
from vault.store import BlobStore
from vault.throttle import ThrottleStore
from wire.protocol import MAX_FRAME, ProtocolError, error_frame

log = structlog.get_logger("procserver")


class VaultUnavailableError(TransientStoreError):
    """The process server has not been able to open its vault yet."""


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
        self.policies = Policies(self)  # pulled policies; retention on them (retention.py)
        self.space = CacheSpace(cfg.cache_quota_bytes, self.metrics.cache_bytes, self.background)
        self._sessions = asyncio.Semaphore(cfg.max_sessions)
        self._tasks: list[asyncio.Task[None]] = []
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._handshakes = 0  # TCP connections accepted whose TLS handshake is not done
        self._handshakes_by_host: Counter[str] = Counter()
        self._ssl: ssl.SSLContext | None = None
        self.cycles = CycleBook(self)  # being received, and resumable ones while suspended
        self.rate_limit = TokenBucket(Schedule.constant(cfg.receive_bytes_per_second)) \
            if cfg.receive_bytes_per_second > 0 else None
        self.heartbeat_seconds = max(0.05, cfg.idle_timeout_seconds / 4)
        self._queued = self._queued_total = 0
        self._streams: set[FrameStream] = set()
        self.receiving = 0  # sessions receiving a cycle now
        self.metrics.suspended_cycles.set_function(self.cycles.suspended)
        self.metrics.receive_buffer_bytes.set_function(lambda: self.receive_buffered)
        self._listeners: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self.points_changed = asyncio.Condition()
        self.cycles_changed = asyncio.Condition()  # a cycle was suspended or aborted
        self._runner: web.AppRunner | None = None
        self.port = cfg.listen_port
        self.metrics_port = cfg.metrics_port
        self._vault: Vault | None = None
        self.vault_ready = asyncio.Event()  # set once the vault is open
        self.index = Index()

    async def start(self) -> None:
        responsive_gil()
        # The vault and its key first: a wrong key or URL must leave nothing behind.
        # Storage that does not answer is not a reason to refuse agents: the cache takes
        # their cycles and the vault is opened in the background (invariant 9).
        km = KeyMaterial(keyfile=read_keyfile(self.cfg.vault_key_file))
        store: BlobStore = open_store(self.cfg.vault_url, StoreMetrics(self.metrics.registry))
        schedule = self.cfg.upload_schedule()
        if not schedule.unlimited:  # pace uploads; the cache absorbs the difference
            store = ThrottleStore(store, TokenBucket(schedule))
        self._store = store
        try:
            await self._open_vault(store, km)
        except TransientStoreError as e:
            log.error("vault_unavailable", vault=store.url, error=str(e),
                      hint="agents are acknowledged into the cache; uploads start as soon "
                           "as the storage answers")
        except BaseException:
            await store.close()
            raise
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.engine, self.sessionmaker = await db.open_db(
                str(self.data_dir / "procserver.db"))
        except BaseException:
            await (self._vault.close() if self._vault is not None else store.close())
            raise
        await self.cycles.recover()
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
        if self._vault is None:
            self._tasks.append(asyncio.create_task(self._open_vault_later(store, km),
                                                   name="open-vault"))
        log.info("procserver_started", port=self.port, metrics_port=self.metrics_port,
                 vault=store.url, vault_open=self._vault is not None,
                 blocks_indexed=len(self.index))

    @property
    def vault(self) -> Vault:
        """The vault; ``VaultUnavailableError`` while its storage has not answered yet."""
        if self._vault is None:
            raise VaultUnavailableError(f"the vault at {self._store.url} has not answered "
                                        "since this process server started")
        return self._vault

    async def _open_vault(self, store: BlobStore, km: KeyMaterial) -> None:
        vault = await Vault.open(store, km)
        try:
            self.index = await vault.load_index()
        except BaseException:
            await vault.close()
            raise
        self._vault = vault
        self.vault_ready.set()

    async def _open_vault_later(self, store: BlobStore, km: KeyMaterial) -> None:
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self._open_vault(store, km)
            except TransientStoreError as e:
                delay = min(delay * 2, 60.0)
                log.warning("vault_unavailable", vault=store.url, error=str(e),
                            retry_in_seconds=delay)
                continue
            except Exception as e:  # a wrong key, a vault that is not there: say so loudly
                delay = min(delay * 2, 60.0)
                log.error("vault_open_failed", vault=store.url, error=str(e),
                          error_type=type(e).__name__, retry_in_seconds=delay,
                          hint="check vault_url and vault_key_file; the cache keeps filling")
                continue
            log.info("vault_opened", vault=store.url, blocks_indexed=len(self.index))
            self.uploader.wake()
            return

    async def stop(self, grace: float = 5.0) -> None:
        for t in self._acceptors:
            t.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for sock in self._listeners:
            sock.close()
        self.cycles.stop_timers()
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
        await (self._vault.close() if self._vault is not None else self._store.close())
        await self.engine.dispose()
        self.executor.shutdown(wait=True)
        log.info("procserver_stopped")

    def background(self, coro: Any) -> None:
        """Run ``coro`` as a task that shutdown waits for (like a connection's)."""
        t = asyncio.get_running_loop().create_task(coro)
        self._conn_tasks.add(t)
        t.add_done_callback(self._conn_tasks.discard)

    def suspended(self) -> int:
        """Resumable cycles waiting for their agent to resume them (``CycleBook``)."""
        return self.cycles.suspended()

    # -- cache space (CacheSpace) ------------------------------------------------------
    async def reserve_cache(self, cycle_seq: int, n: int, wait: bool = True) -> None:
        """Account ``n`` cache bytes to a cycle; wait (backpressure) while over quota."""
        await self.space.reserve(cycle_seq, n, wait)

    def release_cache(self, cycle_seq: int, n: int | None = None) -> None:
        """Give back ``n`` of a cycle's cache bytes (all that remain when ``None``)."""
        self.space.release(cycle_seq, n)

    @property
    def cache_bytes(self) -> int:
        return self.space.used

    # -- receive buffering: bytes received and not yet in the cache --------------------
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
            self.background(self._connection(sock, host))

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

    async def _metrics(self, _req: web.Request) -> web.Response:
        await refresh_metrics(self)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _req: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "cache_bytes": self.space.used,
                                  "vault_open": self._vault is not None})


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

