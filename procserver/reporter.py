"""The process server's side of the configuration server's internal API.

Two loops, both only with ``configserver_url`` and the internal token:

- **Point reports.** An outbox in the process server's database: a point is marked
  reported only after the configuration server accepted it, so reports survive
  restarts. One it refuses for good (a 4xx other than 401, 408, 429) is logged
  ``point_report_refused`` and parked until a refresh or a restart, so the reports
  behind it are not held up.
- **Heartbeats** every ``heartbeat_interval_seconds``: name, address, version and
  health — cache use and free share of the quota, upload backlog (bytes and the
  age of the oldest data waiting for upload), upload throughput, open sessions, and
  how long uploads to the vault have been failing with the last error
  (``procserver/storagehealth.py``).
  The first one registers this process server. When the answer says an operator
  asked for a refresh, the outbox is re-sent, ``on_refresh`` callbacks re-pull what
  they get from the configuration server, and another heartbeat goes out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.backoff import Backoff
from procserver import db
from procserver.backlog import pending_cycles, upload_backlog
from procserver.cachespace import CacheSpace
from procserver.csclient import ConfigServerClient, ConfigServerError
from procserver.storagehealth import StorageHealth

log = structlog.get_logger("procserver.reporter")
REFUSED = frozenset({400, 403, 404, 405, 409, 410, 413, 415, 422})
POINTS = "/api/v1/internal/points"
HEARTBEAT = "/api/v1/internal/procservers/heartbeat"


def _version() -> str:
    try:
        return metadata.version("siterecovery")
    except metadata.PackageNotFoundError:
        return "unknown"


def server_name(configured: str) -> str:
    """This process server's name at the configuration server ("" = the host name)."""
    return configured or socket.gethostname().split(".")[0]


@dataclass(frozen=True)
class Identity:
    """Who this process server is, as the heartbeat says: ``port`` is read at each beat
    (the listener may have been given an ephemeral one)."""

    name: str
    listen_host: str
    port: Callable[[], int]
    advertise: str = ""  # HOST:PORT given by the operator: said as it is

    def address(self) -> str:
        if self.advertise:
            return self.advertise
        host = self.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        port = self.port()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Reporter:
    """The point-report outbox and the heartbeats (both only with a configuration server).

    ``on_refresh`` callbacks run when the configuration server asks for a refresh."""

    def __init__(self, client: ConfigServerClient, identity: Identity,
                 sessionmaker: async_sessionmaker[AsyncSession], cache_dir: Path,
                 space: CacheSpace, registry: CollectorRegistry,
                 heartbeat_interval: float, storage: StorageHealth | None = None) -> None:
        self.client, self.identity = client, identity
        self.sessionmaker, self.cache_dir = sessionmaker, cache_dir
        self.space, self.registry = space, registry
        self.heartbeat_interval = heartbeat_interval
        # The uploader's failing writes to the vault (it is handed this one).
        self.storage = storage if storage is not None else StorageHealth()
        self._changed = asyncio.Event()
        self._beat = asyncio.Event()
        # Called when the configuration server asks for a refresh (e.g. re-pull trust).
        self.on_refresh: list[Callable[[], None]] = []
        # Reports the configuration server refused for good (4xx but 401/408/429).
        self._parked: set[str] = set()
        self.registered = False  # a heartbeat was accepted since the start
        self._uploaded: tuple[float, float] | None = None  # (monotonic time, bytes) last beat
        self.passes = 0  # passes over the outbox finished (sent, parked or failed)
        self.passed = asyncio.Condition()  # notified after each pass

    @property
    def parked(self) -> frozenset[str]:
        """Points whose report the configuration server refused for good (until a refresh)."""
        return frozenset(self._parked)

    def wake(self) -> None:
        """Look at the point outbox now."""
        self._changed.set()

    def beat(self) -> None:
        """Send a heartbeat now instead of at the next interval."""
        self._beat.set()

    @property
    def name(self) -> str:
        return self.identity.name

    async def run(self) -> None:
        if not self.client.enabled:
            log.warning("point_reporting_disabled",
                        hint="set configserver_url to list points in the catalog")
            return
        await self.client.wait_token("point_reporting_blocked")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._report_points(), name="point-reports")
            tg.create_task(self._heartbeats(), name="heartbeats")

    # -- point reports ---------------------------------------------------------------
    async def _report_points(self) -> None:
        backoff = Backoff(jitter=False)
        while True:
            self._changed.clear()
            async with self.sessionmaker() as s:
                rows = (await s.execute(select(db.PointReport).where(
                    db.PointReport.reported.is_(False),
                    db.PointReport.point_id.not_in(self._parked))
                    .order_by(db.PointReport.point_id).limit(100))).scalars().all()
            try:
                for row in rows:
                    answer = await self.client.post(POINTS, json.loads(row.doc))
                    if answer.status in REFUSED:
                        # Sending it again will not change the answer: park it (until
                        # a refresh or a restart) so the reports behind it go on.
                        self._parked.add(row.point_id)
                        log.error("point_report_refused", point=row.point_id,
                                  machine=row.machine, status=answer.status,
                                  error=answer.excerpt(),
                                  hint="fix the cause, then 'siterecovery procserver "
                                       "refresh NAME' sends it again")
                        continue
                    if answer.status >= 300:
                        raise ConfigServerError(f"HTTP {answer.status}: {answer.excerpt()}")
                    async with self.sessionmaker() as s:
                        r = await s.get_one(db.PointReport, row.point_id)
                        r.reported = True
                        await s.commit()
                backoff.reset()
                await self._passed()
            except ConfigServerError as e:
                delay = backoff.next()
                log.warning("point_report_failed", error=str(e), retry_in_seconds=delay)
                await self._passed()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
                continue
            if not rows:
                await self._changed.wait()

    async def _passed(self) -> None:
        async with self.passed:
            self.passes += 1
            self.passed.notify_all()

    # -- heartbeats ------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        failing = again = False
        while True:
            self._beat.clear()
            immediate, again = again, False
            try:
                doc = await self.status()
                answer = await self.client.post(HEARTBEAT, doc)
                if answer.status >= 300:
                    raise ConfigServerError(f"HTTP {answer.status}: {answer.excerpt()}")
                reply: dict[str, Any] = answer.json()
                self.registered = True
                if failing:
                    log.info("heartbeat_restored")
                    failing = False
                if reply.get("refresh_requested"):
                    log.info("procserver_refresh_requested", procserver=doc["name"])
                    self._parked.clear()  # refused reports are tried again
                    self.wake()
                    for hook in self.on_refresh:
                        hook()
                    if not immediate:  # once: a misbehaving server cannot make us spin
                        again = True
                        continue  # heartbeat again at once: the refresh is seen done
            except (ConfigServerError, ValueError) as e:
                # One line per failure is enough: it recurs only every interval.
                log.warning("heartbeat_failed", error=str(e) or type(e).__name__,
                            retry_in_seconds=self.heartbeat_interval)
                failing = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await self._beat.wait()

    async def status(self) -> dict[str, Any]:
        """This process server's health, as the heartbeat sends it."""
        used, quota = self.space.used, self.space.quota
        disk_free = (await asyncio.to_thread(shutil.disk_usage, self.cache_dir)).free
        # The cache can grow by what the quota allows and the disk still holds.
        free = max(0, min(quota - used, disk_free))
        backlog_bytes, backlog_seconds = await upload_backlog(self.sessionmaker,
                                                              self.cache_dir)
        registry = self.registry
        uploaded = registry.get_sample_value("siterecovery_procserver_uploaded_bytes_total") \
            or 0.0
        mono = time.monotonic()
        throughput = 0.0
        if self._uploaded is not None and mono > self._uploaded[0]:
            throughput = max(0.0, (uploaded - self._uploaded[1]) / (mono - self._uploaded[0]))
        self._uploaded = (mono, uploaded)
        return {
            "name": self.name, "address": self.identity.address(), "version": _version(),
            "cache_bytes": used, "cache_free_ratio": round(min(1.0, free / quota), 4),
            "backlog_bytes": backlog_bytes, "backlog_seconds": round(backlog_seconds, 1),
            "throughput_bps": round(throughput, 1),
            "sessions": int(registry.get_sample_value("siterecovery_procserver_sessions") or 0),
            "pending_cycles": await pending_cycles(self.sessionmaker),
            **self.storage.heartbeat(),
        }
