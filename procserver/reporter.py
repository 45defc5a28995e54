"""The process server's side of the configuration server's internal API.

Two loops, both only with ``configserver_url`` and the internal token:

- **Point reports.** An outbox in the process server's database: a point is marked
  reported only after the configuration server accepted it, so reports survive
  restarts. One it refuses for good (a 4xx other than 401, 408, 429) is logged
  ``point_report_refused`` and parked until a refresh or a restart, so the reports
  behind it are not held up.
- **Heartbeats** every ``heartbeat_interval_seconds``: name, address, version and
  health — cache use and free share of the quota, upload backlog (bytes and the
  age of the oldest data waiting for upload), upload throughput, open sessions.
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
import ssl
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from sqlalchemy import exists, func, select

from procserver import db
from procserver.config import ProcServerConfig

if TYPE_CHECKING:
    from procserver.server import ProcServer

log = structlog.get_logger("procserver.reporter")
REFUSED = frozenset({400, 403, 404, 405, 409, 410, 413, 415, 422})
JOURNAL = "changes.log"  # procserver/uploader.py: the cycle's journal, written per checkpoint


async def configserver_access(cfg: ProcServerConfig, blocked_event: str
                              ) -> tuple[dict[str, str], ssl.SSLContext | bool]:
    """The internal token's header (waiting until the token file can be read) and the
    TLS setting for ``configserver_url`` (the site listener: our own CA)."""
    delay = 1.0
    while True:
        try:
            with open(cfg.configserver_token_file) as f:
                token = f.read().strip()
            break
        except OSError as e:
            log.error(blocked_event, error=f"cannot read token file: {e}",
                      hint="configserver_token_file must name the configuration server's "
                           "internal-token file", retry_in_seconds=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
    tls: ssl.SSLContext | bool = True
    if cfg.configserver_url.startswith("https:"):
        tls = ssl.create_default_context(cafile=cfg.tls_ca)
    return {"Authorization": f"Bearer {token}"}, tls


def _version() -> str:
    try:
        return metadata.version("siterecovery")
    except metadata.PackageNotFoundError:
        return "unknown"


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


class Reporter:
    def __init__(self, server: ProcServer) -> None:
        self.server = server
        self._changed = asyncio.Event()
        self._beat = asyncio.Event()
        # Called when the configuration server asks for a refresh (e.g. re-pull trust).
        self.on_refresh: list[Callable[[], None]] = []
        # Reports the configuration server refused for good (4xx but 401/408/429).
        self._parked: set[str] = set()
        self.registered = False  # a heartbeat was accepted since the start
        self._uploaded: tuple[float, float] | None = None  # (monotonic time, bytes) last beat

    def wake(self) -> None:
        """Look at the point outbox now."""
        self._changed.set()

    def beat(self) -> None:
        """Send a heartbeat now instead of at the next interval."""
        self._beat.set()

    @property
    def name(self) -> str:
        return self.server.cfg.name or socket.gethostname().split(".")[0]

    async def run(self) -> None:
        cfg = self.server.cfg
        if not cfg.configserver_url:
            log.warning("point_reporting_disabled",
                        hint="set configserver_url to list points in the catalog")
            return
        headers, tls = await configserver_access(cfg, "point_reporting_blocked")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                         connector=aiohttp.TCPConnector(ssl=tls)) as http, \
                asyncio.TaskGroup() as tg:
            tg.create_task(self._report_points(http, headers), name="point-reports")
            tg.create_task(self._heartbeats(http, headers), name="heartbeats")

    # -- point reports ---------------------------------------------------------------
    async def _report_points(self, http: aiohttp.ClientSession, headers: dict[str, str]
                             ) -> None:
        url = self.server.cfg.configserver_url.rstrip("/") + "/api/v1/internal/points"
        delay = 1.0
        while True:
            self._changed.clear()
            async with self.server.sessionmaker() as s:
                rows = (await s.execute(select(db.PointReport).where(
                    db.PointReport.reported.is_(False),
                    db.PointReport.point_id.not_in(self._parked))
                    .order_by(db.PointReport.point_id).limit(100))).scalars().all()
            try:
                for row in rows:
                    async with http.post(url, json=json.loads(row.doc),
                                         headers=headers) as resp:
                        if resp.status in REFUSED:
                            # Sending it again will not change the answer: park it (until
                            # a refresh or a restart) so the reports behind it go on.
                            self._parked.add(row.point_id)
                            log.error("point_report_refused", point=row.point_id,
                                      machine=row.machine, status=resp.status,
                                      error=(await resp.text())[:500],
                                      hint="fix the cause, then 'siterecovery procserver "
                                           "refresh NAME' sends it again")
                            continue
                        if resp.status >= 300:
                            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                    async with self.server.sessionmaker() as s:
                        r = await s.get_one(db.PointReport, row.point_id)
                        r.reported = True
                        await s.commit()
                delay = 1.0
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
                log.warning("point_report_failed", error=str(e), retry_in_seconds=delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
                delay = min(delay * 2, 60.0)
                continue
            if not rows:
                await self._changed.wait()

    # -- heartbeats ------------------------------------------------------------------
    async def _heartbeats(self, http: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        cfg = self.server.cfg
        url = cfg.configserver_url.rstrip("/") + "/api/v1/internal/procservers/heartbeat"
        failing = again = False
        while True:
            self._beat.clear()
            immediate, again = again, False
            try:
                doc = await self.status()
                async with http.post(url, json=doc, headers=headers) as resp:
                    if resp.status >= 300:
                        raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                    answer: dict[str, Any] = await resp.json()
                self.registered = True
                if failing:
                    log.info("heartbeat_restored")
                    failing = False
                if answer.get("refresh_requested"):
                    log.info("procserver_refresh_requested", procserver=doc["name"])
                    self._parked.clear()  # refused reports are tried again
                    self.wake()
                    for hook in self.on_refresh:
                        hook()
                    if not immediate:  # once: a misbehaving server cannot make us spin
                        again = True
                        continue  # heartbeat again at once: the refresh is seen done
            except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as e:
                # One line per failure is enough: it recurs only every interval.
                log.warning("heartbeat_failed", error=str(e) or type(e).__name__,
                            retry_in_seconds=cfg.heartbeat_interval_seconds)
                failing = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.heartbeat_interval_seconds):
                    await self._beat.wait()

    def address(self) -> str:
        host = self.server.cfg.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        return f"[{host}]:{self.server.port}" if ":" in host else f"{host}:{self.server.port}"

    async def status(self) -> dict[str, Any]:
        """This process server's health, as the heartbeat sends it."""
        server, cfg = self.server, self.server.cfg
        used = server.cache_bytes
        disk_free = (await asyncio.to_thread(shutil.disk_usage, server.cache_dir)).free
        # The cache can grow by what the quota allows and the disk still holds.
        free = max(0, min(cfg.cache_quota_bytes - used, disk_free))
        backlog_bytes, backlog_seconds = await self.backlog()
        registry = server.metrics.registry
        uploaded = registry.get_sample_value("siterecovery_procserver_uploaded_bytes_total") \
            or 0.0
        mono = time.monotonic()
        throughput = 0.0
        if self._uploaded is not None and mono > self._uploaded[0]:
            throughput = max(0.0, (uploaded - self._uploaded[1]) / (mono - self._uploaded[0]))
        self._uploaded = (mono, uploaded)
        return {
            "name": self.name, "address": self.address(), "version": _version(),
            "cache_bytes": used, "cache_free_ratio": round(min(1.0, free / cfg.cache_quota_bytes),
                                                           4),
            "backlog_bytes": backlog_bytes, "backlog_seconds": round(backlog_seconds, 1),
            "throughput_bps": round(throughput, 1),
            "sessions": int(registry.get_sample_value("siterecovery_procserver_sessions") or 0),
        }

    async def backlog(self) -> tuple[int, float]:
        """Bytes waiting for upload and how long the oldest of them has waited (seconds).

        Waiting are the sealed segments of cycles still receiving or complete; a complete
        cycle with every segment consumed waits for its ``finish`` since its last checkpoint.
        A segment's waiting starts when it was sealed (its file's last write).
        """
        live = (db.RECEIVING, db.COMPLETE)
        async with self.server.sessionmaker() as s:
            total = (await s.execute(
                select(func.coalesce(func.sum(db.Segment.size), 0))
                .join(db.Cycle, db.Cycle.seq == db.Segment.cycle_seq)
                .where(db.Cycle.state.in_(live)))).scalar_one()
            oldest = (await s.execute(
                select(db.Segment.path).join(db.Cycle, db.Cycle.seq == db.Segment.cycle_seq)
                .where(db.Cycle.state.in_(live)).order_by(db.Segment.id).limit(4))
            ).scalars().all()
            finishing = (await s.execute(select(db.Cycle).where(
                db.Cycle.state == db.COMPLETE,
                ~exists().where(db.Segment.cycle_seq == db.Cycle.seq)))).scalars().all()
        cache = self.server.cache_dir

        def since() -> list[float]:
            times = []
            for p in oldest:  # the oldest one may be consumed meanwhile: take the next
                if (t := _mtime(Path(p))) is not None:
                    times.append(t)
                    break
            for c in finishing:
                t = _mtime(cache / c.machine / c.id / JOURNAL)
                times.append(t if t is not None else c.created)
            return times

        times = await asyncio.to_thread(since)
        age = max(0.0, time.time() - min(times)) if times else 0.0
        return int(total), age
