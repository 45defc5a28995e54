"""Report recovery points to the configuration server over its internal API.

An outbox in the process server's database: a point is marked reported only
after the configuration server accepted it, so reports survive restarts.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import aiohttp
import structlog
from sqlalchemy import select

from procserver import db

if TYPE_CHECKING:
    from procserver.server import ProcServer

log = structlog.get_logger("procserver.reporter")


class Reporter:
    def __init__(self, server: ProcServer) -> None:
        self.server = server
        self._changed = asyncio.Event()

    def wake(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        cfg = self.server.cfg
        if not cfg.configserver_url:
            log.warning("point_reporting_disabled",
                        hint="set configserver_url to list points in the catalog")
            return
        delay = 1.0
        while True:
            try:
                with open(cfg.configserver_token_file) as f:
                    token = f.read().strip()
                break
            except OSError as e:
                log.error("point_reporting_blocked", error=f"cannot read token file: {e}",
                          hint="configserver_token_file must name the configuration server's "
                               "internal-token file", retry_in_seconds=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
        headers = {"Authorization": f"Bearer {token}"}
        url = cfg.configserver_url.rstrip("/") + "/api/v1/internal/points"
        delay = 1.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            while True:
                self._changed.clear()
                async with self.server.sessionmaker() as s:
                    rows = (await s.execute(select(db.PointReport).where(
                        db.PointReport.reported.is_(False)).limit(100))).scalars().all()
                try:
                    for row in rows:
                        async with http.post(url, json=json.loads(row.doc),
                                             headers=headers) as resp:
                            if resp.status >= 300:
                                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                        async with self.server.sessionmaker() as s:
                            r = await s.get_one(db.PointReport, row.point_id)
                            r.reported = True
                            await s.commit()
                    delay = 1.0
                except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
                    log.warning("point_report_failed", error=str(e), retry_in_seconds=delay)
                    try:
                        async with asyncio.timeout(delay):
                            await self._changed.wait()
                    except TimeoutError:
                        pass
                    delay = min(delay * 2, 60.0)
                    continue
                if not rows:
                    await self._changed.wait()
