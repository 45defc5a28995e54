"""Capped, jittered exponential back-off for retry loops.

One ``Backoff`` per loop: ``next()`` gives the seconds to wait before the next try
(doubling from ``base`` up to ``cap``, each wait jittered to 50-100 % so that many
clients do not retry in step); ``reset()`` after a success.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable


class Backoff:
    def __init__(self, base: float = 1.0, cap: float = 60.0, *, jitter: bool = True,
                 rand: Callable[[float, float], float] = random.uniform) -> None:
        if base <= 0 or cap < base:
            raise ValueError("back-off needs 0 < base <= cap")
        self.base, self.cap, self.jitter = base, cap, jitter
        self._rand = rand
        self.failures = 0

    def delay(self, attempt: int) -> float:
        """The wait before try number ``attempt + 1`` (attempt 0 waits about ``base``)."""
        d = min(self.cap, self.base * 2 ** min(attempt, 62))
        return float(d * self._rand(0.5, 1.0)) if self.jitter else float(d)

    def next(self) -> float:
        """Count one more failure and return how long to wait before trying again."""
        d = self.delay(self.failures)
        self.failures += 1
        return d

    async def sleep(self) -> float:
        """Wait ``next()`` seconds; return them."""
        d = self.next()
        await asyncio.sleep(d)
        return d

    def reset(self) -> None:
        self.failures = 0
