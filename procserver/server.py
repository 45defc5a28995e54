"""``ProcServer``: the process-server daemon (TLS listener, uploader, reporter, metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import select

from procserver import db
from procserver.cache import cache_usage, remove_cycle_dir
from procserver.config import ProcServerConfig
from procserver.metrics import ProcMetrics
from procserver.reporter import Reporter
from procserver.session import Session
from procserver.uploader import Uploader
from procserver.wire import MAX_FRAME, ProtocolError, error_frame
from vault.instrument import StoreMetrics
from vault.keyslots import KeyMaterial, read_keyfile
from vault.open import open_store
from vault.repo import Vault

log = structlog.get_logger("procserver")


def server_ssl_context(cfg: ProcServerConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cfg.tls_ca)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def peer_machine(writer: asyncio.StreamWriter) -> str | None:
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
        self._cache_bytes = 0
        self._cycle_bytes: dict[int, int] = {}
        self._space = asyncio.Condition()
        self._sessions = asyncio.Semaphore(cfg.max_sessions)
        self._tasks: list[asyncio.Task[None]] = []
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.points_changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = cfg.listen_port
        self.metrics_port = cfg.metrics_port

    async def start(self) -> None:
        # The vault and its key first: a wrong key or URL must leave nothing behind.
        km = KeyMaterial(keyfile=read_keyfile(self.cfg.vault_key_file))
        self.vault = await Vault.open(
            open_store(self.cfg.vault_url, StoreMetrics(self.metrics.registry)), km)
        try:
            self.index = await self.vault.load_index()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.engine, self.sessionmaker = await db.open_db(
                str(self.data_dir / "procserver.db"))
        except BaseException:
            await self.vault.close()
            raise
        await self._recover()
        self._server = await asyncio.start_server(
            self._accept, self.cfg.listen_host, self.cfg.listen_port,
            ssl=server_ssl_context(self.cfg), ssl_handshake_timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.metrics_host, self.cfg.metrics_port)
        await site.start()
        self.metrics_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._tasks = [asyncio.create_task(self.uploader.run(), name="uploader"),
                       asyncio.create_task(self.reporter.run(), name="reporter")]
        log.info("procserver_started", port=self.port, metrics_port=self.metrics_port,
                 vault=self.vault.store.url, blocks_indexed=len(self.index))

    async def _recover(self) -> None:
        """Drop cycles that were never acknowledged; account for the ones still cached.

        Cycles still receiving when we died were never acked: their data goes. Cache
        folders of no complete cycle (left by a crash between a database commit and
        the folder's removal) are removed too.
        """
        async with self.sessionmaker() as s:
            rows = (await s.execute(select(db.Cycle).where(db.Cycle.state == db.RECEIVING))
                    ).scalars().all()
            for row in rows:
                row.state = db.ABORTED
            await s.commit()
            live = (await s.execute(select(db.Cycle).where(db.Cycle.state == db.COMPLETE))
                    ).scalars().all()
        if rows:
            log.warning("unacknowledged_cycles_dropped", count=len(rows))
        keep = {self.cache_dir / c.machine / c.id: c.seq for c in live}
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
        if self._server is not None:
            self._server.close()
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
    async def reserve_cache(self, cycle_seq: int, n: int) -> None:
        """Account ``n`` cache bytes to a cycle; wait (backpressure) while over quota."""
        if self._cache_bytes + n > self.cfg.cache_quota_bytes:
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

    # -- connections ---------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            self._conn_tasks.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        machine = peer_machine(writer)
        if machine is None:  # cannot happen with CERT_REQUIRED, kept as a guard
            writer.close()
            return
        if self._sessions.locked():
            self.metrics.rejected.labels("busy").inc()
            writer.write(error_frame("busy", "too many sessions", "retry later"))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        async with self._sessions:
            self.metrics.sessions.inc()
            session = Session(self, reader, writer, machine)
            try:
                await session.run()
            except ProtocolError as e:
                self.metrics.rejected.labels(e.code).inc()
                session.log.warning("session_rejected", code=e.code, error=str(e))
                with contextlib.suppress(ConnectionError, RuntimeError):
                    writer.write(error_frame(e.code, str(e)))
                    await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, ssl.SSLError, TimeoutError) as e:
                session.log.info("session_lost", error=str(e) or type(e).__name__)
            finally:
                self.metrics.sessions.dec()
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 5)

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
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _req: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "cache_bytes": self._cache_bytes})


def _subdirs(p: Path) -> list[Path]:
    return [c for c in p.iterdir() if c.is_dir()] if p.is_dir() else []
