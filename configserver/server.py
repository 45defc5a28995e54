"""``ConfigServer``: the configuration-server daemon.

Two listeners: the admin API on loopback (bearer token), and the site listener
(TLS with this server's CA; client certificates optional) where agents enroll
with the passphrase and then authenticate with their machine certificate, and
where process servers heartbeat and report recovery points.

This is where the parts are wired, once: the catalog, clock, notifier and metrics
(``Core``), the job engine with its explicit kinds, and the ``Services`` the API
handlers get. Shutdown runs in a fixed order: stop accepting on both listeners, let
in-flight requests finish within ``SHUTDOWN_GRACE_SECONDS`` (then they are cancelled),
stop the job engine and the other background tasks, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from aiohttp import web

from common.tls import server_context
from configserver import console, db, jobkinds, selfregister, sitecert, tokens
from configserver.alerts import AlertBook
from configserver.api import all_routes
from configserver.background import background_tasks
from configserver.ca import CertificateAuthority, write_bundle
from configserver.config import ConfigServerConfig
from configserver.core import Core, Notifier
from configserver.defaults import ensure_defaults
from configserver.enrollment import Throttle
from configserver.jobs import JobEngine
from configserver.metrics import ConfigMetrics
from configserver.peer import verify_peer
from configserver.pgnotify import PgNotifyLink, asyncpg_dsn
from configserver.rest import RouteTable
from configserver.services import Services
from configserver.tlssite import LoggingTLSSite
from vault.manifestcache import ManifestCache

log = structlog.get_logger("configserver")

# How long requests in flight at shutdown may take to finish before they are cancelled
# (aiohttp's default, made explicit: long polls wait at most 60 s).
SHUTDOWN_GRACE_SECONDS = 60.0


class ConfigServer:
    def __init__(self, cfg: ConfigServerConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock  # UNIX seconds; tests inject one to age heartbeats and points
        self.metrics = ConfigMetrics()
        self.notifier = Notifier()  # notified when items, points or agents change
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.port = cfg.listen_port
        self.site_port = cfg.site_port

    @property
    def changed(self) -> asyncio.Condition:
        """Notified whenever items, points, agents, jobs or alerts change."""
        return self.notifier.changed

    async def start(self) -> None:
        d = Path(self.cfg.data_dir)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.admin_token = tokens.load_or_create(self.cfg.token_path)
        self.internal_token = tokens.load_or_create(self.cfg.internal_token_path)
        self.passphrase = tokens.load_or_create(self.cfg.passphrase_path)
        self.ca = CertificateAuthority.load_or_create(self.cfg.ca_dir)
        self.metrics.watch_certificates(sitecert.tls_dir(d) / "site.pem", self.ca.cert_path)
        self.engine, self.sessionmaker = await db.open_db(self.cfg.db_url)
        self._targets = jobkinds.targets_of(self.cfg)  # closed by stop()
        self.manifests = ManifestCache()  # the recovery jobs' point manifests, shared
        core = Core(self.engine, self.sessionmaker, self.clock, self.notifier, self.metrics)
        self.services = Services(
            database=self.engine, sessionmaker=self.sessionmaker, clock=self.clock,
            notifier=self.notifier, metrics=self.metrics, cfg=self.cfg, ca=self.ca,
            jobs=JobEngine(core, jobkinds.for_config(self.cfg, self._targets,
                                                     self.manifests)),
            alert_book=AlertBook(up_since=self.clock(),
                                 drill_warning_days=self.cfg.drill_warning_days,
                                 storage_alert_seconds=self.cfg.storage_alert_seconds),
            throttle=Throttle(), admin_token=self.admin_token,
            internal_token=self.internal_token, passphrase=self.passphrase)
        try:
            # the "default" policy, the secrets key
            await ensure_defaults(core, self.cfg.secrets_key_path)
            await self._listen()
        except BaseException:
            await self.stop()
            raise
        for coro in background_tasks(self.services):
            self._tasks.append(asyncio.create_task(coro))
        if self.cfg.vault_url:  # it holds the vault's key: it registers itself
            self._tasks.append(asyncio.create_task(selfregister.run(
                core, self.cfg.vault_url, self.cfg.vault_key_file)))
        if self.engine.dialect.name == "postgresql":
            # Other configuration servers on this catalog wake with this one's changes.
            link = PgNotifyLink(asyncpg_dsn(self.engine.url), self.notifier)
            self.notifier.publish = link.publish
            self._tasks.append(asyncio.create_task(link.run()))
            with contextlib.suppress(TimeoutError):  # it keeps trying in the background
                async with asyncio.timeout(10):
                    await link.connected.wait()
        log.info("configserver_started", port=self.port, site_port=self.site_port,
                 token_file=str(self.cfg.token_path), database=self.engine.url.drivername)

    async def _listen(self) -> None:
        routes = all_routes()
        self.admin_table = RouteTable(self.services, routes, "admin")
        admin_app = self.admin_table.app()
        console.mount(admin_app, self.services)  # the web console, under /console/
        runner = web.AppRunner(admin_app, access_log=None,
                               shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.cfg.listen_host, self.cfg.listen_port)
        await site.start()
        self.port = site.port
        if self.cfg.site_port < 0:
            return
        self.site_table = RouteTable(self.services, routes, "site")
        services = self.services
        srunner = web.AppRunner(self.site_table.app(lambda r: verify_peer(services, r)),
                                access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
        await srunner.setup()
        self._runners.append(srunner)
        tls = sitecert.tls_dir(self.cfg.data_dir)
        # a revoked certificate is not served, now nor after it is revoked (sitecert.py)
        await sitecert.reissue_if_revoked(self.services, self.ca, tls)
        site_tls = self._site_tls()
        sitecert.watch(site_tls, tls, str(self.ca.cert_path))
        ssite = LoggingTLSSite(srunner, self.cfg.site_host, self.cfg.site_port,
                               ssl_context=site_tls)
        await ssite.start()
        self.site_port = ssite.port

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
        # enrollment comes without a certificate: CERT_OPTIONAL
        return server_context(cafile=str(self.ca.cert_path), certfile=str(tls / "site.pem"),
                              keyfile=str(tls / "site.key"), verify_mode=ssl.CERT_OPTIONAL)

    @property
    def url(self) -> str:
        return f"http://{self.cfg.listen_host}:{self.port}"

    @property
    def site_url(self) -> str:
        host = self.cfg.site_host
        if host in ("0.0.0.0", "::"):
            host = socket.getfqdn()
        return f"https://{host}:{self.site_port}"

    async def notify(self) -> None:
        await self.notifier.notify()

    async def stop(self) -> None:
        """Stop accepting, drain, stop background work, close the catalog (in that order,
        as uvicorn does): a request in flight still has the job engine and the database."""
        for r in self._runners:  # 1. close every listening socket first
            for site in list(r.sites):
                await site.stop()
        if hasattr(self, "services"):  # agents' long polls answer now, not within 55 s
            self.services.agent_watch.close()
        in_flight = sum(len(r.server.connections) for r in self._runners if r.server)
        if in_flight:
            log.info("configserver_draining", connections=in_flight,
                     grace_seconds=SHUTDOWN_GRACE_SECONDS)
        # 2. idle connections close at once; requests in progress get the grace period,
        # then aiohttp cancels them.
        await asyncio.gather(*(r.cleanup() for r in self._runners))
        self._runners.clear()
        # 3. background work: jobs resume at the next start where they stood.
        for t in self._tasks:
            t.cancel()
        cancelled = 0
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
            cancelled += t.cancelled()
        self._tasks.clear()
        if cancelled:
            log.info("configserver_background_stopped", tasks=cancelled)
        # 4. the recovery targets (their clients; instantly recovered disks stop being
        # served: a restart serves them again where they stood).
        for target in getattr(self, "_targets", {}).values():
            try:
                await target.close()
            except Exception as e:  # the rest must still stop
                log.warning("target_close_failed", target=target.name, error=str(e))
        # 5. the catalog.
        if hasattr(self, "engine"):
            await self.engine.dispose()
        log.info("configserver_stopped")
