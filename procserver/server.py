"""``ProcServer``: the process-server daemon, wired in one place.

``start`` opens the vault (or keeps opening it in the background while its storage
does not answer) and the bookkeeping database, then ``_wire`` builds every component
once, each given what it uses: the cycle book (``cycles``), the cache space
(``cachespace``), the uploader, the reporter, the trust list, the policies (and their
retention), the listener and its sessions. Long-lived loops run under one
``Supervisor``: a crash of any of them is logged ``task_crashed`` and ends
``serve_until`` with ``TaskCrashedError``, so the daemon exits non-zero instead of
limping on. ``stop`` goes in a fixed order: stop accepting, let sessions finish within
the grace (``sessions_cancelled_at_shutdown`` names how many did not), cancel the rest,
close resources (``procserver_stopped``).

Before the uploader goes on with the cycles a previous run was writing, the packs that
run (or a failed upload) left outside the index are adopted or removed
(``_settle_orphans``, procserver/orphans.py); the pack log (``DATA_DIR/pack-log``) says
which packs are ours.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from common.pacing import Schedule, TokenBucket
from procserver import db
from procserver.barrier import Barriers
from procserver.cachespace import CacheSpace
from procserver.config import ProcServerConfig
from procserver.csclient import ConfigServerClient
from procserver.cycles import CycleBook
from procserver.datadirlock import DataDirLock
from procserver.framestream import FrameStream
from procserver.groupoutbox import GroupPointOutbox
from procserver.heap import HeapTrim, return_large_buffers
from procserver.installreq import BUNDLE_NAME, InstallRequests
from procserver.listener import Listener, ListenerLimits, listen, server_ssl_context
from procserver.metrics import ProcMetrics
from procserver.orphans import resumable_cycles
from procserver.packlog import PackLog
from procserver.policies import Policies
from procserver.recvbuffers import ReceiveBuffers
from procserver.reporter import Identity, Reporter, server_name
from procserver.scrape import ScrapeGauges
from procserver.session import Session
from procserver.sessiondeps import SessionDeps, SessionSettings
from procserver.supervisor import Supervisor, TaskCrashedError
from procserver.trust import TrustList
from procserver.uploader import Uploader
from procserver.vaultaccess import VaultAccess, key_material
from vault.errors import TransientStoreError
from vault.repo import Vault
from vault.store.instrument import StoreMetrics
from vault.store.open import open_store
from wire.protocol import MAX_FRAME

log = structlog.get_logger("procserver")

# The event loop shares the GIL with CPU-bound threads (sealing, cache writing). With
# CPython's default 5 ms switch interval, every return of the loop from a system call can
# wait that long for the GIL behind them (the convoy effect); 1 ms keeps the loop, and so
# the network, moving. Set process-wide, only ever lowered.
SWITCH_INTERVAL = 0.001


def responsive_gil() -> None:
    if sys.getswitchinterval() > SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)


class ProcServer:
    # Built by ``_wire`` during ``start``.
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    vaults: VaultAccess
    client: ConfigServerClient
    buffers: ReceiveBuffers
    space: CacheSpace
    uploader: Uploader
    cycles: CycleBook
    reporter: Reporter
    trust: TrustList
    policies: Policies
    installs: InstallRequests
    listener: Listener
    scrape: ScrapeGauges
    barriers: Barriers  # the consistency groups' barriers (procserver/barrier.py)
    group_reports: GroupPointOutbox
    heap: HeapTrim  # gives the heap's free pages back after points and checkpoints (heap.py)
    vault_ready: asyncio.Event  # set once the vault is open (``vaults.ready``)

    def __init__(self, cfg: ProcServerConfig) -> None:
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir)
        self.cache_dir = self.data_dir / "cache"
        self.metrics = ProcMetrics()
        self.metrics.watch_certificates(Path(cfg.tls_cert), Path(cfg.tls_ca))
        self.executor = ThreadPoolExecutor(cfg.upload_threads, thread_name_prefix="seal")
        self.supervisor = Supervisor()
        self.port = cfg.listen_port
        self.metrics_port = cfg.metrics_port
        self._listeners: list[socket.socket] = []
        self._accepting: list[str] = []
        self._runner: web.AppRunner | None = None
        self.dir_lock = DataDirLock(self.data_dir)

    # -- wiring ----------------------------------------------------------------------
    def _wire(self, vaults: VaultAccess, engine: AsyncEngine,
              sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        """Build every component once, each with what it uses."""
        cfg, metrics, spawn = self.cfg, self.metrics, self.supervisor.spawn
        self.engine, self.sessionmaker, self.vaults = engine, sessionmaker, vaults
        self.vault_ready = vaults.ready
        self.client = ConfigServerClient(cfg.configserver_url, cfg.configserver_token_file,
                                         cfg.tls_ca)
        self.buffers = ReceiveBuffers(cfg.receive_buffer_bytes)
        self.space = CacheSpace(cfg.cache_quota_bytes, metrics.cache_bytes, spawn)
        self.reporter = Reporter(
            self.client, Identity(server_name(cfg.name), cfg.listen_host, lambda: self.port,
                                  cfg.advertise_address),
            sessionmaker, self.cache_dir, self.space, metrics.registry,
            cfg.heartbeat_interval_seconds)
        self.heap = HeapTrim(spawn, metrics.heap_trims, metrics.heap_released_bytes)

        def on_point() -> None:
            self.reporter.wake()
            self.heap.request()  # a cycle's transient buffers are free now

        self.uploader = Uploader(sessionmaker, vaults, self.cache_dir, self.space,
                                 self.executor, metrics, cfg.upload_threads,
                                 on_point=on_point, storage=self.reporter.storage,
                                 on_checkpoint=self.heap.request)
        vaults.on_open = self.uploader.wake
        vaults.before_ready = self._settle_orphans  # when it opens in the background
        self.cycles = CycleBook(sessionmaker, self.cache_dir, self.space,
                                cfg.resume_window_seconds, wake_uploader=self.uploader.wake,
                                spawn=spawn, withhold_upload=self.uploader.withhold)
        self.trust = TrustList(self.client, self.data_dir, cfg.tls_ca, cfg.tls_cert)
        self.policies = Policies(self.client, self.data_dir, cfg.policy_interval_seconds,
                                 self.reporter.name, lambda: self.reporter.registered,
                                 sessionmaker, vaults)
        self.reporter.on_refresh += [self.trust.wake, self.policies.wake]
        self.installs = InstallRequests(self.client, self.reporter.name,
                                        self.data_dir / BUNDLE_NAME)
        self.scrape = ScrapeGauges(metrics, self.policies, sessionmaker, self.cache_dir,
                                   self.space)
        metrics.suspended_cycles.set_function(self.cycles.suspended)
        metrics.receive_buffer_bytes.set_function(lambda: self.buffers.buffered)
        self.group_reports = GroupPointOutbox(sessionmaker, self._post_group_point,
                                              enabled=self.client.enabled)
        self.barriers = Barriers(self._group_point_outcome, book=self.group_reports)
        self.cycles.on_abort.append(self.barriers.cycle_dropped)
        self.uploader.on_drop.append(self.barriers.cycle_dropped)
        self.uploader.drop_open = self.cycles.drop
        rate_limit = TokenBucket(Schedule.constant(cfg.receive_bytes_per_second)) \
            if cfg.receive_bytes_per_second > 0 else None
        deps = SessionDeps(
            SessionSettings(idle_timeout=cfg.idle_timeout_seconds,
                            resume_window=cfg.resume_window_seconds,
                            segment_bytes=cfg.segment_bytes, max_frame=MAX_FRAME,
                            heartbeat_seconds=max(0.05, cfg.idle_timeout_seconds / 4),
                            resync_range_blocks=cfg.resync_range_blocks),
            sessionmaker, self.cache_dir, metrics, self.trust, self.cycles, self.space,
            self.buffers, rate_limit, vaults, self.uploader, self.executor, self.barriers)

        def make_session(stream: FrameStream, machine: str, peer: str) -> Session:
            return Session(deps, stream, machine, peer)

        self.listener = Listener(
            ListenerLimits(cfg.max_handshakes, cfg.max_handshakes_per_host,
                           cfg.handshake_timeout_seconds, cfg.max_sessions, MAX_FRAME),
            server_ssl_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key), metrics, self.buffers,
            make_session, spawn)

    # -- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        # One process server per data directory, before anything in it is touched: a
        # second one would settle the first one's packs in flight as orphans.
        await asyncio.to_thread(self.dir_lock.acquire)
        try:
            await self._start()
        except BaseException:
            self.dir_lock.release()
            raise

    async def _start(self) -> None:
        responsive_gil()
        return_large_buffers()  # freed large buffers unmapped at once (procserver/heap.py)
        # The vault and its key first: a wrong key or URL must leave nothing behind.
        # Storage that does not answer is not a reason to refuse agents: the cache takes
        # their cycles and the vault is opened in the background (invariant 9).
        km = await asyncio.to_thread(key_material, self.cfg)  # WrongKeyError names the source
        schedule = self.cfg.upload_schedule()  # uploads paced; the cache absorbs the rest
        store = open_store(self.cfg.vault_url, StoreMetrics(self.metrics.registry),
                           upload_bucket=None if schedule.unlimited else TokenBucket(schedule))
        vaults = VaultAccess(store, km, pack_log=PackLog(self.data_dir / "pack-log"),
                             index_dir=self.data_dir / "index",
                             index_memory=self.cfg.index_memory_bytes,
                             frame_bytes=self.cfg.pack_frame_bytes,
                             zstd_level=self.cfg.pack_zstd_level)
        try:
            await vaults.open()
        except TransientStoreError as e:
            log.error("vault_unavailable", vault=store.url, error=str(e),
                      hint="agents are acknowledged into the cache; uploads start as soon "
                           "as the storage answers")
        except BaseException:
            await store.close()
            raise
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            engine, sessionmaker = await db.open_db(str(self.data_dir / "procserver.db"))
        except BaseException:
            await vaults.close()
            raise
        self._wire(vaults, engine, sessionmaker)
        await self.cycles.recover()
        for doc in await self.group_reports.recover():  # barriers open when we stopped
            self.metrics.group_points.labels(state=doc["state"]).inc()
            self.barriers.outcomes[doc["id"]] = doc  # a member coming late learns why
        if vaults.is_open:  # before the uploader goes on with the cycles it was writing
            await self._settle_orphans()
        self._listeners = await asyncio.to_thread(
            listen, self.cfg.listen_host, self.cfg.listen_port)
        self.port = self._listeners[0].getsockname()[1]
        sup = self.supervisor
        for i, sock in enumerate(self._listeners):
            self._accepting.append(f"accept-{i}")
            sup.start(self._accepting[-1], self.listener.accept_loop(sock))
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.metrics_host, self.cfg.metrics_port)
        await site.start()
        self.metrics_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        sup.start("uploader", self.uploader.run())
        sup.start("reporter", self.reporter.run())
        sup.start("trust", self.trust.run())
        sup.start("policies", self.policies.run())
        sup.start("install-requests", self.installs.run())
        sup.start("group-point-reports", self.group_reports.run())
        if not vaults.is_open:
            sup.start("open-vault", vaults.open_later())
        log.info("procserver_started", port=self.port, metrics_port=self.metrics_port,
                 vault=store.url, vault_open=vaults.is_open,
                 blocks_indexed=len(vaults.index))

    async def _settle_orphans(self) -> None:
        """Adopt or remove the packs a killed run or a failed upload of ours left outside
        the index (procserver/orphans.py), knowing which cycles will resume."""
        await self.vaults.settle_orphans(await resumable_cycles(self.sessionmaker))

    async def serve_until(self, stop: Awaitable[Any]) -> None:
        """Run until ``stop`` completes; raise ``TaskCrashedError`` as soon as a supervised
        task crashes (the caller then calls ``stop()`` and exits non-zero)."""
        stopper = asyncio.ensure_future(stop)
        failed = self.supervisor.failed
        try:
            await asyncio.wait({stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not stopper.done():
                stopper.cancel()
                await asyncio.gather(stopper, return_exceptions=True)
        if failed.done():
            crash: TaskCrashedError = failed.result()
            log.error("procserver_failed", task=crash.name, error=str(crash.error),
                      hint="the process server stops: a part of it no longer runs")
            raise crash

    async def stop(self, grace: float = 5.0) -> None:
        sup = self.supervisor
        await sup.cancel(self._accepting)  # stop accepting
        for sock in self._listeners:
            sock.close()
        self.cycles.stop_timers()
        cancelled = await sup.drain(grace)  # sessions finish within the grace
        if cancelled:
            log.warning("sessions_cancelled_at_shutdown", count=cancelled)
        stopped = await sup.cancel()  # the loops
        if self._runner is not None:
            await self._runner.cleanup()
        await self.client.close()
        await self.vaults.close()
        await self.engine.dispose()
        self.executor.shutdown(wait=True)
        self.dir_lock.release()
        log.info("procserver_stopped", tasks_cancelled=stopped)

    # -- for tools and tests -----------------------------------------------------------
    @property
    def vault(self) -> Vault:
        """The open vault (``VaultUnavailableError`` until it is)."""
        return self.vaults.vault

    async def wait_point(self, cycle: str, timeout: float = 300.0) -> str:
        """Wait until the acknowledged ``cycle`` is a whole point in the vault; return its
        id (``Uploader.wait_point``)."""
        return await self.uploader.wait_point(cycle, timeout)

    def _group_point_outcome(self, doc: dict[str, Any]) -> None:
        self.metrics.group_points.labels(state=doc["state"]).inc()

    async def _post_group_point(self, doc: dict[str, Any]) -> int:
        return (await self.client.post("/api/v1/internal/group-points", doc)).status

    # -- HTTP: metrics and health ----------------------------------------------------
    async def _metrics(self, _req: web.Request) -> web.Response:
        await self.scrape.refresh()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _req: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "cache_bytes": self.space.used,
                                  "vault_open": self.vaults.is_open})
