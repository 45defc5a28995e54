"""``ConfigServer``: the configuration-server daemon."""

from __future__ import annotations

from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from configserver import db, tokens
from configserver.api import Api
from configserver.ca import CertificateAuthority
from configserver.config import ConfigServerConfig

log = structlog.get_logger("configserver")


class ConfigMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.points = Counter("siterecovery_configserver_recovery_points",
                              "Recovery points recorded in the catalog", registry=self.registry)


class ConfigServer:
    def __init__(self, cfg: ConfigServerConfig) -> None:
        self.cfg = cfg
        self.metrics = ConfigMetrics()
        self._runner: web.AppRunner | None = None
        self.port = cfg.listen_port

    async def start(self) -> None:
        Path(self.cfg.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.admin_token = tokens.load_or_create(self.cfg.token_path)
        self.internal_token = tokens.load_or_create(self.cfg.internal_token_path)
        self.ca = CertificateAuthority.load_or_create(self.cfg.ca_dir)
        self.engine, self.sessionmaker = await db.open_db(self.cfg.db_url)
        self._runner = web.AppRunner(Api(self).app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.listen_host, self.cfg.listen_port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("configserver_started", port=self.port, token_file=str(self.cfg.token_path))

    @property
    def url(self) -> str:
        return f"http://{self.cfg.listen_host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.engine.dispose()
        log.info("configserver_stopped")
