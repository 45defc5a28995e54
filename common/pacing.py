"""Pacing: byte rates with work-hours and off-hours values (as ASR's process-server throttling).

A ``Schedule`` says how many bytes per second are allowed at a given local time:
one value inside the work hours of the work days, another outside them (0 means
unlimited). A ``TokenBucket`` enforces the current value, from coroutines (``take``)
or from threads (``take_blocking``): the agent paces its sends with it, the process
server its cache writes and (through the vault's ``ThrottleStore``) its uploads.

Both take their clocks as arguments so their arithmetic is tested without waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


def parse_days(spec: str) -> frozenset[int]:
    """``mon-fri``, ``mon,wed,fri``, ``sat-sun``… → weekday numbers (Monday = 0)."""
    out: set[int] = set()
    for part in spec.lower().replace(" ", "").split(","):
        a, sep, b = part.partition("-")
        if a not in DAYS or (sep and b not in DAYS):
            raise ValueError(f"work days {spec!r}: use day names {'/'.join(DAYS)}, e.g. "
                             "'mon-fri' or 'mon,wed,fri'")
        i, j = DAYS.index(a), DAYS.index(b) if sep else DAYS.index(a)
        out.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
    return frozenset(out)


def parse_hours(spec: str) -> tuple[int, int]:
    """``08:00-18:00`` → (480, 1080) minutes after midnight; the end may be 24:00."""
    m = _HOURS.match(spec.strip())
    if not m:
        raise ValueError(f"work hours {spec!r}: use HH:MM-HH:MM, e.g. '08:00-18:00'")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if end > 24 * 60 or start >= end:
        raise ValueError(f"work hours {spec!r}: the start must come before the end")
    return start, end


@dataclass(frozen=True)
class Schedule:
    work_bytes_per_second: float  # 0: unlimited
    off_bytes_per_second: float  # 0: unlimited
    work_days: frozenset[int] = frozenset(range(5))
    work_minutes: tuple[int, int] = (8 * 60, 18 * 60)

    @classmethod
    def from_mbps(cls, work_mbps: float, off_mbps: float, days: str = "mon-fri",
                  hours: str = "08:00-18:00") -> Schedule:
        """Megabits per second, as network links are sold (0: unlimited)."""
        if work_mbps < 0 or off_mbps < 0:
            raise ValueError("bandwidth limits must be 0 (unlimited) or positive Mbit/s")
        return cls(work_mbps * 125_000, off_mbps * 125_000, parse_days(days),
                   parse_hours(hours))

    def rate_at(self, when: dt.datetime) -> float:
        minute = when.hour * 60 + when.minute
        working = (when.weekday() in self.work_days
                   and self.work_minutes[0] <= minute < self.work_minutes[1])
        return self.work_bytes_per_second if working else self.off_bytes_per_second

    @classmethod
    def constant(cls, bytes_per_second: float) -> Schedule:
        """The same rate at every hour (0: unlimited)."""
        return cls(bytes_per_second, bytes_per_second)

    @property
    def unlimited(self) -> bool:
        return self.work_bytes_per_second == 0 and self.off_bytes_per_second == 0


class TokenBucket:
    """Allows ``rate`` bytes per second on average with bursts of one second's worth.

    Each caller reserves its bytes at once (the bucket may go negative) and then waits
    until they are paid for, so callers are served in the order they asked, whether
    they wait in a coroutine or in a thread.
    """

    def __init__(self, schedule: Schedule, *,
                 now: Callable[[], dt.datetime] = dt.datetime.now,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 sleep_blocking: Callable[[float], None] = time.sleep) -> None:
        self.schedule = schedule
        self._now, self._monotonic = now, monotonic
        self._sleep, self._sleep_blocking = sleep, sleep_blocking
        self._tokens = 0.0
        self._last = monotonic()
        self._rate = -1.0
        self._lock = threading.Lock()

    def _reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` from the bucket; return how long the caller must wait."""
        rate = self.schedule.rate_at(self._now())
        if rate <= 0:
            return 0.0
        with self._lock:
            if rate != self._rate:  # the schedule switched: start a fresh second
                self._rate, self._tokens, self._last = rate, rate, self._monotonic()
            t = self._monotonic()
            self._tokens = min(rate, self._tokens + (t - self._last) * rate)
            self._last = t
            self._tokens -= nbytes
            return -self._tokens / rate if self._tokens < 0 else 0.0

    async def take(self, nbytes: int) -> float:
        """Wait until ``nbytes`` may pass; return the seconds waited."""
        waited = self._reserve(nbytes)
        if waited > 0:
            await self._sleep(waited)
        return waited

    def take_blocking(self, nbytes: int) -> float:
        """``take`` for a thread: block it until ``nbytes`` may pass."""
        waited = self._reserve(nbytes)
        if waited > 0:
            self._sleep_blocking(waited)
        return waited
