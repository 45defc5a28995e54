"""Policies at the process server: pulled from the configuration server, applied here.

With ``configserver_url``, every ``policy_interval_seconds`` (and when the configuration
server asks for a refresh) the process server pulls ``GET
/api/v1/internal/procservers/{name}/policies``: the policy of each replicated item whose
machine is assigned to it. A valid answer replaces the policies in memory and in
``data_dir/policies.json``, so a restart while the configuration server is unreachable
still has them; an unreachable server or a malformed answer changes nothing.

**Retention.** After each pull (or once per interval on the saved policies) each such
machine's points older than its ``retention_hours`` are forgotten in the vault with the
vault's own plan (``vault/retention.py``: every point of the window kept, none thinned;
the newest point and the newest app-consistent point always kept), under the vault's
exclusive lock as prune takes it. Also kept: the point of each machine's newest uploaded
cycle and every point a cycle still in the cache builds on (the agent's next delta names
them), and points not yet reported to the catalog (a report after the forget would list
a point that is gone). As prune does, a kept point whose delta chain crosses a forgotten
one first gets full maps (rebase), then the forgotten manifests are deleted. Garbage
collection — maps, packs and index entries only forgotten points used — is left to
``siterecovery prune``.

**The catalog** is told through an outbox (``forgotten_points``): rows are written
before the manifests are deleted, sent to ``POST /api/v1/internal/points/forgotten``
and removed once accepted; ids whose manifest still exists (a round interrupted between
the two) are dropped unsent, the next round forgets those points again.

**Metrics** refreshed at scrape time (``refresh_metrics``): cache free ratio, upload
backlog age, each machine's RPO (age of its newest point, on ``clock``) and the RPO
threshold of its policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import structlog
from sqlalchemy import String, delete, func, select
from sqlalchemy.orm import Mapped, mapped_column

from procserver import db
from vault import names
from vault.errors import MissingObjectError
from vault.locks import LockedError, locked
from vault.maps import FULL, BlockMap
from vault.point import DiskEntry, Point
from vault.repo import MAX_CHAIN
from vault.retention import Retention, plan

if TYPE_CHECKING:
    from procserver.server import ProcServer

log = structlog.get_logger("procserver.policies")

POLICY_FILE = "policies.json"
MAX_ANSWER_BYTES = 16 << 20
LOCK_WAIT = 30.0  # for the exclusive lock; a busy vault defers retention to the next round
LOG_IDS = 100  # point ids named per log event (the count is always whole)
REPORT_BATCH = 1000  # ids per catalog request (configserver/api_points.py MAX_FORGOTTEN)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# Each policy field and the values accepted from the configuration server.
BOUNDS = {"rpo_threshold_seconds": (1, 10**8), "retention_hours": (1, 10**6),
          "app_consistent_frequency_seconds": (0, 10**8),
          "crash_consistent_interval_seconds": (1, 10**8), "block_size": (1, 1 << 30)}


class PolicyAnswerError(ValueError):
    """The configuration server's answer is not a valid list of item policies."""


@dataclass(frozen=True)
class ItemPolicy:
    machine: str
    name: str
    rpo_threshold_seconds: int
    retention_hours: int
    app_consistent_frequency_seconds: int
    crash_consistent_interval_seconds: int
    block_size: int

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        return {"machine": doc.pop("machine"), "policy": doc}


def parse_answer(doc: Any) -> dict[str, ItemPolicy]:
    """``{"items": [{"machine", "policy": {name, fields…}}]}`` → policies by machine;
    raises ``PolicyAnswerError`` naming the first problem (nothing is partly accepted)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise PolicyAnswerError("the answer is not an object with an 'items' list")
    out: dict[str, ItemPolicy] = {}
    for i, item in enumerate(doc["items"]):
        where = f"items[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("policy"), dict):
            raise PolicyAnswerError(f"{where}: not an object with a 'policy' object")
        machine, p = item.get("machine"), item["policy"]
        if not isinstance(machine, str) or not _NAME.fullmatch(machine):
            raise PolicyAnswerError(f"{where}: 'machine' is not a machine name")
        if machine in out:
            raise PolicyAnswerError(f"{where}: machine {machine!r} is listed twice")
        if not isinstance(p.get("name"), str) or not _NAME.fullmatch(p["name"]):
            raise PolicyAnswerError(f"{where}: the policy's 'name' is not a policy name")
        values: dict[str, int] = {}
        for k, (lo, hi) in BOUNDS.items():
            v = p.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise PolicyAnswerError(f"{where}: policy field {k!r} must be an integer "
                                        f"from {lo} to {hi}, not {v!r}")
            values[k] = v
        out[machine] = ItemPolicy(machine=machine, name=p["name"], **values)
    return out


class ForgottenPoint(db.Base):
    """Outbox: points retention forgot in the vault that the catalog still has to drop."""

    __tablename__ = "forgotten_points"
    point_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    machine: Mapped[str] = mapped_column(String(255))


@dataclass
class RetentionReport:
    forgotten: dict[str, list[str]] = field(default_factory=dict)  # machine -> point ids
    kept: dict[str, str] = field(default_factory=dict)  # point id -> why
    rebased: list[str] = field(default_factory=list)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _created(p: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(p)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class Policies:
    def __init__(self, server: ProcServer) -> None:
        self.server = server
        self.path = Path(server.cfg.data_dir) / POLICY_FILE
        self.items: dict[str, ItemPolicy] = {}  # by machine
        self.known = False  # a valid answer was pulled or loaded
        # Retention and the RPO metric measure ages on this clock (tests inject one).
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.rounds = 0  # rounds of the loop finished (pull, report, retention)
        self.changed = asyncio.Condition()  # notified after each round
        self._wake = asyncio.Event()
        self._work = asyncio.Lock()  # one retention round or outbox flush at a time
        server.reporter.on_refresh.append(self.wake)
        self._load_saved()

    def wake(self) -> None:
        """Pull the policies now (a refresh the configuration server asked for)."""
        self._wake.set()

    # -- the saved answer --------------------------------------------------------------
    def _load_saved(self) -> None:
        try:
            items = parse_answer(json.loads(self.path.read_bytes()))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("policies_unreadable", path=str(self.path), error=str(e),
                        hint="they are pulled again from the configuration server")
            return
        self.items, self.known = items, True
        log.info("policies_loaded", path=str(self.path), machines=len(items))

    async def _save(self) -> None:
        doc = {"items": [p.to_json() for p in self.items.values()],
               "pulled": datetime.now(UTC).isoformat(timespec="seconds")}
        await asyncio.to_thread(_write_atomic, self.path, json.dumps(doc).encode())

    # -- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.server.cfg
        if not cfg.configserver_url:
            log.info("policy_pull_disabled", hint="set configserver_url to apply the "
                     "configuration server's policies (retention)")
            return
        delay = 1.0
        while True:
            try:
                with open(cfg.configserver_token_file) as f:
                    token = f.read().strip()
                break
            except OSError as e:  # the reporter logs the same cause, with the hint
                log.warning("policy_pull_blocked", error=f"cannot read token file: {e}",
                            retry_in_seconds=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
        headers = {"Authorization": f"Bearer {token}"}
        tls: ssl.SSLContext | bool = True
        if cfg.configserver_url.startswith("https:"):  # the site listener: our own CA
            tls = ssl.create_default_context(cafile=cfg.tls_ca)
        interval = cfg.policy_interval_seconds
        last_round = float("-inf")
        delay = 1.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                         connector=aiohttp.TCPConnector(ssl=tls)) as http:
            while True:
                self._wake.clear()
                ok = await self._pull(http, headers, delay)
                # Retention after each pull; on the saved policies while pulls fail.
                if ok or time.monotonic() - last_round >= interval:
                    last_round = time.monotonic()
                    await self._retention_round()
                try:
                    await self.flush_forgotten(http, headers)
                except Exception as e:  # the vault or the database: retried next round
                    log.error("forgotten_report_failed", error=str(e) or type(e).__name__,
                              error_type=type(e).__name__)
                async with self.changed:
                    self.rounds += 1
                    self.changed.notify_all()
                wait, delay = (interval, 1.0) if ok else (min(delay, interval),
                                                         min(delay * 2, interval))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    async def _pull(self, http: aiohttp.ClientSession, headers: dict[str, str],
                    retry_in: float) -> bool:
        cfg = self.server.cfg
        name = self.server.reporter.name
        url = f"{cfg.configserver_url.rstrip('/')}/api/v1/internal/procservers/" \
              f"{quote(name, safe='')}/policies"
        try:
            async with http.get(url, headers=headers) as resp:
                raw = bytearray()
                while chunk := await resp.content.readany():
                    raw += chunk
                    if len(raw) > MAX_ANSWER_BYTES:
                        raise PolicyAnswerError(f"the answer is larger than "
                                                f"{MAX_ANSWER_BYTES} bytes")
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: "
                                       f"{raw[:500].decode(errors='replace')}")
            items = parse_answer(json.loads(raw))
        except ValueError as e:  # PolicyAnswerError, or not JSON at all
            log.error("policies_rejected", error=str(e), url=url,
                      hint="the policies in use stay; is configserver_url a configuration "
                           "server of the same version?", machines=len(self.items))
            return False
        except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
            log.warning("policy_pull_failed", error=str(e) or type(e).__name__,
                        retry_in_seconds=retry_in, using="saved" if self.known else "none",
                        machines=len(self.items))
            return False
        if items != self.items or not self.known:
            changed = sorted(m for m in set(items) | set(self.items)
                             if items.get(m) != self.items.get(m))
            self.items, self.known = items, True
            await self._save()
            log.info("policies_updated", machines=len(items), changed=changed)
        return True

    async def _retention_round(self) -> None:
        try:
            await self.apply_retention()
        except LockedError as e:
            log.info("retention_deferred", reason=str(e),
                     retry_in_seconds=self.server.cfg.policy_interval_seconds)
        except Exception as e:  # a failing store or database: the next round plans again
            log.error("retention_failed", error=str(e) or type(e).__name__,
                      error_type=type(e).__name__, hint="nothing is lost: an interrupted "
                      "round leaves every kept point whole; the next round plans again")

    # -- retention ---------------------------------------------------------------------
    async def _protected(self) -> dict[str, str]:
        """Points this process server still needs, with why."""
        out: dict[str, str] = {}
        async with self.server.sessionmaker() as s:
            newest = select(func.max(db.Cycle.seq)).where(
                db.Cycle.state == db.UPLOADED).group_by(db.Cycle.machine)
            for pid in (await s.execute(select(db.Cycle.point_id).where(
                    db.Cycle.seq.in_(newest)))).scalars():
                if pid is not None:
                    out[pid] = "newest uploaded cycle (the agent's next delta builds on it)"
            cached = select(db.Cycle.base).where(
                db.Cycle.state.in_([db.RECEIVING, db.COMPLETE]), db.Cycle.base.is_not(None))
            for pid in (await s.execute(select(db.Cycle.point_id).where(
                    db.Cycle.id.in_(cached)))).scalars():
                if pid is not None:
                    out[pid] = "a cycle in the cache builds on it"
            for pid in (await s.execute(select(db.PointReport.point_id).where(
                    db.PointReport.reported.is_(False)))).scalars():
                out[pid] = "not yet reported to the catalog"
        return out

    async def apply_retention(self) -> RetentionReport:
        """Forget, for each machine with a policy, the points past its retention.

        Raises ``LockedError`` when the vault stays locked for ``LOCK_WAIT`` seconds."""
        report = RetentionReport()
        policies = dict(self.items)
        if not policies:
            return report
        vault = self.server.vault
        async with self._work, locked(vault, "exclusive", "retention", wait=LOCK_WAIT):
            now = self.clock()
            protected = await self._protected()  # under the lock: no point appears now
            points = await vault.list_points()
            by_id = {p.id: p for p in points}
            forget: dict[str, list[Point]] = {}
            for machine, pol in policies.items():
                pts = [p for p in points if p.machine == machine]
                if not pts:
                    continue
                r = float(pol.retention_hours)
                try:
                    keep = plan(pts, Retention(r, r, r, r), now)
                except ValueError as e:
                    log.error("retention_failed", machine=machine, error=str(e))
                    continue
                for p in pts:
                    if p.id in protected:
                        keep.setdefault(p.id, protected[p.id])
                report.kept.update({p.id: keep[p.id] for p in pts if p.id in keep})
                gone = [p for p in pts if p.id not in keep]
                if gone:
                    forget[machine] = gone
            if not forget:
                return report
            ids = {p.id for pts in forget.values() for p in pts}
            async with self.server.sessionmaker() as s:  # the outbox first
                for pts in forget.values():
                    for p in pts:
                        await s.merge(ForgottenPoint(point_id=p.id, machine=p.machine))
                await s.commit()
            for pid in [k for k in report.kept if by_id[k].machine in forget]:
                if await self._crosses(by_id[pid], ids, by_id):
                    await self._rebase(by_id[pid])
                    report.rebased.append(pid)
            for machine, pts in forget.items():
                for p in pts:
                    await vault.store.delete(names.POINTS + p.id)
                report.forgotten[machine] = [p.id for p in pts]
                pol = policies[machine]
                log.info("points_forgotten", machine=machine, count=len(pts),
                         points=[p.id for p in pts[:LOG_IDS]], oldest=pts[0].created,
                         newest=pts[-1].created, policy=pol.name,
                         retention_hours=pol.retention_hours,
                         rebased=[k for k in report.rebased if by_id[k].machine == machine])
        return report

    async def _crosses(self, p: Point, forget: set[str], by_id: dict[str, Point]) -> bool:
        """Whether ``p``'s delta chain passes through a point about to be forgotten (a
        chain that is broken already stays as it is: rebasing cannot mend it)."""
        for _ in range(MAX_CHAIN + 1):
            if p.base is None:
                return False
            if p.base in forget:
                return True
            base = by_id.get(p.base)
            if base is None:
                try:
                    base = by_id[p.base] = await self.server.vault.read_point(p.base)
                except MissingObjectError:
                    return False
            p = base
        return False

    async def _rebase(self, p: Point) -> None:
        """Give ``p`` full maps (same id, replaced atomically), as prune does."""
        vault = self.server.vault
        disks = []
        for d in p.disks:
            full = await vault.resolve_map(p, d.disk)
            map_id = await vault.put_map(BlockMap(FULL, d.size, d.block_size, full.blocks))
            disks.append(DiskEntry(d.disk, d.size, d.block_size, map_id, "full", d.digest))
        await vault.put_point(dataclasses.replace(p, base=None, chain=0, disks=disks))

    # -- the catalog's outbox ----------------------------------------------------------
    async def flush_forgotten(self, http: aiohttp.ClientSession,
                              headers: dict[str, str]) -> None:
        url = self.server.cfg.configserver_url.rstrip("/") + "/api/v1/internal/points/forgotten"
        async with self._work:
            while True:
                async with self.server.sessionmaker() as s:
                    rows = (await s.execute(select(ForgottenPoint).order_by(
                        ForgottenPoint.point_id).limit(REPORT_BATCH))).scalars().all()
                if not rows:
                    return
                gone = [r.point_id for r in rows
                        if not await self.server.vault.has_point(r.point_id)]
                try:
                    if gone:
                        async with http.post(url, json={"points": gone},
                                             headers=headers) as resp:
                            if resp.status != 200:
                                raise RuntimeError(f"HTTP {resp.status}: "
                                                   f"{(await resp.text())[:500]}")
                except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
                    log.warning("forgotten_report_failed", error=str(e) or type(e).__name__,
                                pending=len(rows))
                    return
                async with self.server.sessionmaker() as s:
                    await s.execute(delete(ForgottenPoint).where(
                        ForgottenPoint.point_id.in_([r.point_id for r in rows])))
                    await s.commit()
                log.info("forgotten_points_reported", count=len(gone),
                         still_in_vault=len(rows) - len(gone))

    # -- metrics -----------------------------------------------------------------------
    async def newest_points(self) -> dict[str, datetime]:
        """Each machine's newest point written here: the time it was taken."""
        async with self.server.sessionmaker() as s:
            newest = select(func.max(db.Cycle.seq)).where(
                db.Cycle.state == db.UPLOADED).group_by(db.Cycle.machine)
            rows = (await s.execute(
                select(db.Cycle.machine, db.PointReport.doc)
                .join(db.PointReport, db.PointReport.point_id == db.Cycle.point_id)
                .where(db.Cycle.seq.in_(newest)))).all()
        out = {}
        for machine, doc in rows:
            t = _created(str(json.loads(doc).get("created", "")))
            if t is not None:
                out[machine] = t
        return out

    async def refresh_metrics(self) -> None:
        """Set the gauges computed at scrape time (on failure they keep their values)."""
        server, m = self.server, self.server.metrics
        quota = server.cfg.cache_quota_bytes
        try:
            disk_free = (await asyncio.to_thread(shutil.disk_usage, server.cache_dir)).free
            _bytes, backlog_age = await server.reporter.backlog()
            newest = await self.newest_points()
        except Exception as e:  # the database on a full disk, say: the scrape still answers
            log.warning("metrics_refresh_failed", error=str(e) or type(e).__name__,
                        error_type=type(e).__name__)
            return
        free_ratio = min(1.0, max(0, min(quota - server.cache_bytes, disk_free)) / quota)
        now = self.clock()
        # Once policies are known: the machines assigned here; before, every machine.
        shown = sorted(set(newest) & set(self.items) if self.known else set(newest))
        m.cache_free_ratio.set(free_ratio)
        m.upload_backlog_seconds.set(backlog_age)
        m.item_rpo.clear()
        for machine in shown:
            m.item_rpo.labels(machine).set(max(0.0, (now - newest[machine]).total_seconds()))
        m.item_rpo_threshold.clear()
        for machine, pol in sorted(self.items.items()):
            m.item_rpo_threshold.labels(machine).set(pol.rpo_threshold_seconds)
