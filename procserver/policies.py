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
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import structlog

from common.fs import atomic_write
from common.names import is_name
from procserver.reporter import configserver_access
from procserver.retention import PointRetention, RetentionReport

if TYPE_CHECKING:
    from procserver.server import ProcServer

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
        self.retention = PointRetention(server, self)  # retention.py
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
        await asyncio.to_thread(atomic_write, self.path, json.dumps(doc).encode())

    # -- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.server.cfg
        if not cfg.configserver_url:
            log.info("policy_pull_disabled", hint="set configserver_url to apply the "
                     "configuration server's policies (retention)")
            return
        headers, tls = await configserver_access(cfg, "policy_pull_blocked")
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
                    await self.retention.round()
                try:
                    await self.retention.flush_forgotten(http, headers)
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
                if resp.status == 404 and b"procserver_not_found" in raw and \
                        not self.server.reporter.registered:
                    # Our first heartbeat, which registers us, has not arrived yet.
                    log.info("policy_pull_waiting", reason="not registered yet",
                             retry_in_seconds=retry_in)
                    return False
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

    async def apply_retention(self) -> RetentionReport:
        """Forget, for each machine with a policy, the points past its retention
        (``PointRetention.apply``; raises ``LockedError`` when the vault stays locked)."""
        return await self.retention.apply()
