"""Policies at the process server: pulled from the configuration server, applied here.

With ``configserver_url``, every ``policy_interval_seconds`` (and when the configuration
server asks for a refresh) the process server pulls ``GET
/api/v1/internal/procservers/{name}/policies``: the policy of each replicated item whose
machine is assigned to it. A valid answer replaces the policies in memory and in
``data_dir/policies.json``, so a restart while the configuration server is unreachable
still has them; an unreachable server or a malformed answer changes nothing.

Each round of the loop then applies retention (``retention.py``) and reports forgotten
points to the catalog; ``scrape.py`` reads ``items`` and ``clock`` for the RPO gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.backoff import Backoff
from common.fs import atomic_write
from common.names import is_name
from procserver.csclient import ConfigServerClient, ConfigServerError
from procserver.retention import PointRetention, RetentionReport
from procserver.vaultaccess import VaultAccess

log = structlog.get_logger("procserver.policies")

POLICY_FILE = "policies.json"
MAX_ANSWER_BYTES = 16 << 20
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
        if not is_name(machine):
            raise PolicyAnswerError(f"{where}: 'machine' is not a machine name")
        if machine in out:
            raise PolicyAnswerError(f"{where}: machine {machine!r} is listed twice")
        if not is_name(p.get("name")):
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


class Policies:
    """The policies of the machines assigned to this process server (``name`` at the
    configuration server, through ``client``), pulled every ``interval`` seconds and
    saved in ``data_dir``; each round applies their retention to the vault."""

    def __init__(self, client: ConfigServerClient, data_dir: Path, interval: float,
                 name: str, registered: Callable[[], bool],
                 sessionmaker: async_sessionmaker[AsyncSession], vaults: VaultAccess) -> None:
        self.client, self.interval, self.name = client, interval, name
        self.registered = registered  # our first heartbeat was accepted
        self.path = Path(data_dir) / POLICY_FILE
        self.items: dict[str, ItemPolicy] = {}  # by machine
        self.known = False  # a valid answer was pulled or loaded
        # Retention and the RPO metric measure ages on this clock (tests inject one).
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.rounds = 0  # rounds of the loop finished (pull, report, retention)
        self.changed = asyncio.Condition()  # notified after each round
        self._wake = asyncio.Event()
        self.retention = PointRetention(sessionmaker, vaults, self, client, interval,
                                        spool_dir=Path(data_dir))
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
        await asyncio.to_thread(atomic_write, self.path, json.dumps(doc).encode())

    # -- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        if not self.client.enabled:
            log.info("policy_pull_disabled", hint="set configserver_url to apply the "
                     "configuration server's policies (retention)")
            return
        await self.client.wait_token("policy_pull_blocked")
        interval = self.interval
        last_round = float("-inf")
        backoff = Backoff(base=min(1.0, interval), cap=interval, jitter=False)
        while True:
            self._wake.clear()
            ok = await self._pull(backoff.delay(backoff.failures))
            # Retention after each pull; on the saved policies while pulls fail.
            if ok or time.monotonic() - last_round >= interval:
                last_round = time.monotonic()
                await self.retention.round()
            try:
                await self.retention.flush_forgotten()
            except Exception as e:  # the vault or the database: retried next round
                log.error("forgotten_report_failed", error=str(e) or type(e).__name__,
                          error_type=type(e).__name__)
            async with self.changed:
                self.rounds += 1
                self.changed.notify_all()
            if ok:
                backoff.reset()
                wait = interval
            else:
                wait = backoff.next()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _pull(self, retry_in: float) -> bool:
        path = f"/api/v1/internal/procservers/{quote(self.name, safe='')}/policies"
        url = self.client.url + path
        try:
            answer = await self.client.get(path, max_bytes=MAX_ANSWER_BYTES)
            if answer.status == 404 and b"procserver_not_found" in answer.body and \
                    not self.registered():
                # Our first heartbeat, which registers us, has not arrived yet.
                log.info("policy_pull_waiting", reason="not registered yet",
                         retry_in_seconds=retry_in)
                return False
            if answer.status != 200:
                raise ConfigServerError(f"HTTP {answer.status}: {answer.excerpt()}")
            items = parse_answer(answer.json())
        except ValueError as e:  # PolicyAnswerError, too large, or not JSON at all
            log.error("policies_rejected", error=str(e), url=url,
                      hint="the policies in use stay; is configserver_url a configuration "
                           "server of the same version?", machines=len(self.items))
            return False
        except ConfigServerError as e:
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

    async def apply_retention(self) -> RetentionReport:
        """Forget, for each machine with a policy, the points past its retention
        (``PointRetention.apply``; raises ``LockedError`` when the vault stays locked)."""
        return await self.retention.apply()
