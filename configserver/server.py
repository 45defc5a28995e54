"""``ConfigServer``: the configuration-server daemon.

Two listeners: the admin API on loopback (bearer token), and the site listener
(TLS with this server's CA; client certificates optional) where agents enroll
with the passphrase and then authenticate with their machine certificate, and
where process servers heartbeat and report recovery points.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from aiohttp import web

from configserver import db, tokens
from configserver.api import all_routes
from configserver.ca import CertificateAuthority, write_bundle
from configserver.config import ConfigServerConfig
from configserver.metrics import ConfigMetrics
from configserver.peer import verify_peer
from configserver.rest import RouteTable

log = structlog.get_logger("configserver")


class ConfigServer:
    def __init__(self, cfg: ConfigServerConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock  # UNIX seconds; tests inject one to age heartbeats and points
        self.metrics = ConfigMetrics()
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.port = cfg.listen_port
        self.site_port = cfg.site_port
        self.changed = asyncio.Condition()  # notified when items, points or agents change

    async def start(self) -> None:
        d = Path(self.cfg.data_dir)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.admin_token = tokens.load_or_create(self.cfg.token_path)
        self.internal_token = tokens.load_or_create(self.cfg.internal_token_path)
        self.passphrase = tokens.load_or_create(self.cfg.passphrase_path)
        self.ca = CertificateAuthority.load_or_create(self.cfg.ca_dir)
        self.engine, self.sessionmaker = await db.open_db(self.cfg.db_url)
        try:
            from configserver.defaults import ensure_defaults

            await ensure_defaults(self)  # the "default" policy, the secrets key
            await self._listen()
        except BaseException:
            await self.stop()
            raise
        from configserver.background import background_tasks

        for coro in background_tasks(self):
            self._tasks.append(asyncio.create_task(coro))
        log.info("configserver_started", port=self.port, site_port=self.site_port,
                 token_file=str(self.cfg.token_path), database=self.engine.url.drivername)

    async def _listen(self) -> None:
        routes = all_routes()
        self.admin_table = RouteTable(self, routes, "admin")
        runner = web.AppRunner(self.admin_table.app(), access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.cfg.listen_host, self.cfg.listen_port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.cfg.site_port < 0:
            return
        self.site_table = RouteTable(self, routes, "site")
        srunner = web.AppRunner(self.site_table.app(lambda r: verify_peer(self, r)),
                                access_log=None)
        await srunner.setup()
        self._runners.append(srunner)
        ssite = web.TCPSite(srunner, self.cfg.site_host, self.cfg.site_port,
                            ssl_context=self._site_tls())
        await ssite.start()
        self.site_port = ssite._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def _site_tls(self) -> ssl.SSLContext:
        tls = Path(self.cfg.data_dir) / "tls"
        names = sorted({"127.0.0.1", "localhost", *self.cfg.site_names,
                        *([self.cfg.site_host] if self.cfg.site_host not in ("0.0.0.0", "::")
                          else [])})
        marker = tls / "names"
        if not (tls / "site.pem").exists() or marker.read_text() != ",".join(names):
            write_bundle(tls, "site", self.ca.issue_server("configserver", names),
                         self.ca.cert_pem)
            marker.write_text(",".join(names))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca.cert_path))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(tls / "site.pem", tls / "site.key")
        ctx.verify_mode = ssl.CERT_OPTIONAL  # enrollment comes without a certificate
        return ctx

    @property
    def url(self) -> str:
        return f"http://{self.cfg.listen_host}:{self.port}"

    @property
    def site_url(self) -> str:
        host = self.cfg.site_host
        if host in ("0.0.0.0", "::"):
            import socket

            host = socket.getfqdn()
        return f"https://{host}:{self.site_port}"

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for r in reversed(self._runners):
            await r.cleanup()
        if hasattr(self, "engine"):
            await self.engine.dispose()
        log.info("configserver_stopped")
