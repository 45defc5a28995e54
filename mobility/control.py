"""The agent's side of the configuration server's site listener (mutual TLS with the
machine's certificate): settings, heartbeats and replication progress.

The agent replicates on its own configuration when the configuration server cannot
be reached; these calls steer and report, they never gate the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import structlog
from cryptography import x509

log = structlog.get_logger("mobility.control")
AGENT_VERSION = "0.1.0"


def cert_not_after(path: str) -> float:
    """When the PEM certificate at ``path`` expires (seconds since the epoch)."""
    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return cert.not_valid_after_utc.timestamp()


class ControlError(Exception):
    """The configuration server refused a call or could not be reached."""


@dataclass(frozen=True)
class Settings:
    """What the configuration server wants this machine to do."""

    replicate: bool
    item_state: str | None
    resync_required: bool
    disks: list[dict[str, Any]]
    process_server: str | None  # HOST:PORT
    crash_interval_seconds: float | None
    app_frequency_seconds: float | None  # None or 0: no app-consistent points
    block_size: int | None
    heartbeat_interval_seconds: float

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Settings:
        policy = doc.get("policy") or {}
        ps = doc.get("process_server") or {}
        return cls(
            replicate=bool(doc["replicate"]), item_state=doc.get("item_state"),
            resync_required=bool(doc.get("resync_required")),
            disks=list(doc.get("disks") or []), process_server=ps.get("address"),
            crash_interval_seconds=policy.get("crash_consistent_interval_seconds"),
            app_frequency_seconds=policy.get("app_consistent_frequency_seconds"),
            block_size=policy.get("block_size"),
            heartbeat_interval_seconds=float(doc.get("heartbeat_interval_seconds", 60)))


class ControlPlane:
    def __init__(self, site_url: str, tls_ca: str, tls_cert: str, tls_key: str,
                 timeout: float = 30.0) -> None:
        self.site_url, self.tls_ca = site_url.rstrip("/"), tls_ca
        self.use_cert(tls_cert, tls_key)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None

    def use_cert(self, tls_cert: str, tls_key: str) -> None:
        """Authenticate with this certificate from the next call on (after a renewal)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        ctx.load_cert_chain(tls_cert, tls_key)
        self._ctx = ctx

    async def __aenter__(self) -> ControlPlane:
        self._http = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._http is not None:
            await self._http.close()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        assert self._http is not None, "use 'async with ControlPlane(...)'"
        try:
            async with self._http.request(method, self.site_url + path, json=body,
                                          ssl=self._ctx) as r:
                doc = await r.json(content_type=None)
                if r.status >= 300:
                    err = (doc or {}).get("error", {}) if isinstance(doc, dict) else {}
                    raise ControlError(f"{method} {path}: HTTP {r.status} "
                                       f"{err.get('code', '')}: {err.get('message', '')} "
                                       f"{err.get('hint', '')}".strip())
                return doc
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise ControlError(f"{method} {path}: {type(e).__name__}: {e}") from None

    async def settings(self) -> Settings:
        return Settings.from_doc(await self._call("GET", "/api/v1/agent/settings"))

    async def heartbeat(self) -> dict[str, Any]:
        doc: dict[str, Any] = await self._call("POST", "/api/v1/agent/heartbeat",
                                               {"agent_version": AGENT_VERSION})
        return doc

    async def progress(self, disks: dict[str, float], resync: bool = False) -> None:
        await self._call("POST", "/api/v1/agent/progress", {"disks": disks, "resync": resync})


class ProgressReporter:
    """Turns the cycle's per-disk progress callbacks into ``progress`` calls: at most one
    every ``every`` seconds, always the final 100%. Failures are logged, never raised.

    Created with ``active=False`` it reports nothing until ``start()``: the agent learns
    only at BEGIN whether a cycle copies or compares whole disks (worth reporting) or
    sends a delta (not)."""

    def __init__(self, control: ControlPlane, disks: list[str], resync: bool = False,
                 every: float = 2.0, active: bool = True) -> None:
        self.control, self.resync, self.every, self.active = control, resync, every, active
        self.percent = dict.fromkeys(disks, 0.0)
        self._last_sent = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, resync: bool) -> None:
        """Report from now on; ``resync``: as a resynchronization, not initial replication."""
        self.active, self.resync = True, resync
        self._wake.set()

    def __call__(self, disk: str, done: int, total: int) -> None:
        if self.active and disk in self.percent:
            self.percent[disk] = 100.0 if total <= 0 else min(100.0, 100.0 * done / total)
            self._wake.set()

    async def __aenter__(self) -> ProgressReporter:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if et is None and self.active:  # the cycle was acknowledged: every disk is complete
            self.percent = dict.fromkeys(self.percent, 100.0)
            await self._send()

    async def _send(self) -> None:
        try:
            await self.control.progress(dict(self.percent), self.resync)
        except ControlError as e:
            log.warning("progress_report_failed", error=str(e))
        self._last_sent = time.monotonic()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            wait = self._last_sent + self.every - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # rate limit, not synchronisation
            await self._send()
