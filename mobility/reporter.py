"""Progress of a cycle reported to the configuration server's site listener while it
runs: full copies and resynchronizations always, and any cycle (a delta included) while
the item is being enabled, so an agent that kept its maps ends initial replication with
its first delta (mobility/daemon.py decides)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType

import structlog

from mobility.siteclient import SiteClient, SiteError

log = structlog.get_logger("mobility.control")  # the name its events always had


class ProgressReporter:
    """Turns the cycle's per-disk progress callbacks into ``progress`` calls: at most one
    every ``every`` seconds, always the final 100%. Failures are logged, never raised.

    Created with ``active=False`` it reports nothing until ``start()``: the agent learns
    only at BEGIN whether a cycle copies or compares whole disks (worth reporting) or
    sends a delta (reported only while the item is being enabled)."""

    def __init__(self, site: SiteClient, disks: list[str], resync: bool = False,
                 every: float = 2.0, active: bool = True) -> None:
        self.site, self.resync, self.every, self.active = site, resync, every, active
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
            await self.site.progress(dict(self.percent), self.resync)
        except SiteError as e:
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
