"""The HRL cache's space: the bytes each cycle holds, and backpressure at the quota.

A receiving session reserves each run of frames (and each segment's header) before it
hands them to the cache writer, and waits while that would take the cache past
``cache_quota_bytes``, so a full cache slows the agents down instead of growing. The
uploader releases a cycle's bytes as its segments reach the vault; an aborted cycle
releases all of them at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from prometheus_client import Gauge

log = structlog.get_logger("procserver")


class CacheSpace:
    """The cache's bytes: ``used`` of ``quota`` in all, and what each cycle holds."""

    def __init__(self, quota: int, gauge: Gauge,
                 background: Callable[[Coroutine[Any, Any, None]], object]) -> None:
        self.quota = quota
        self.gauge = gauge  # set to ``used`` on every change
        self.background = background  # runs the wake-up of sessions waiting for space
        self.used = 0  # bytes held in the cache, all cycles together
        self._cycle_bytes: dict[int, int] = {}
        self._space = asyncio.Condition()
        # Cycles whose wait for space is refused, and why (``refuse``).
        self._refused: dict[int, BaseException] = {}

    def hold(self, cycle_seq: int, n: int) -> None:
        """At start: a cycle kept in the cache holds ``n`` bytes there."""
        self._cycle_bytes[cycle_seq] = n
        self.used += n
        self.gauge.set(self.used)

    def fits(self, n: int) -> bool:
        """Whether ``n`` more bytes fit under the quota now."""
        return self.used + n <= self.quota

    def held(self, cycle_seq: int) -> int:
        """The cache bytes the cycle holds."""
        return self._cycle_bytes.get(cycle_seq, 0)

    async def reserve(self, cycle_seq: int, n: int, wait: bool = True) -> None:
        """Account ``n`` cache bytes to a cycle; wait (backpressure) while over quota.

        ``wait=False`` only when a session seals what already arrived before it ends:
        the quota may then be exceeded by that much."""
        if wait and self.used + n > self.quota:
            log.warning("cache_full_backpressure", cache_bytes=self.used)
            async with self._space:
                await self._space.wait_for(
                    lambda: self.used + n <= self.quota or cycle_seq in self._refused)
            refused = self._refused.get(cycle_seq)
            if refused is not None:
                raise refused
        self.used += n
        self._cycle_bytes[cycle_seq] = self._cycle_bytes.get(cycle_seq, 0) + n
        self.gauge.set(self.used)

    def refuse(self, cycle_seq: int, error: BaseException) -> None:
        """Make the cycle's waits for space raise ``error`` from now on (it was dropped:
        the space it waits for may be its own, which only its abort frees), until all of
        its bytes are released."""
        self._refused[cycle_seq] = error
        self.background(self._notify_space())

    def release(self, cycle_seq: int, n: int | None = None) -> None:
        """Give back ``n`` of a cycle's cache bytes (all that remain when ``None``)."""
        if n is None:
            self._refused.pop(cycle_seq, None)
        held = self._cycle_bytes.get(cycle_seq, 0)
        freed = held if n is None else min(n, held)
        if n is None or freed == held:
            self._cycle_bytes.pop(cycle_seq, None)
        else:
            self._cycle_bytes[cycle_seq] = held - freed
        self.used -= freed
        self.gauge.set(self.used)
        if freed:
            self.background(self._notify_space())

    async def _notify_space(self) -> None:
        async with self._space:
            self._space.notify_all()
