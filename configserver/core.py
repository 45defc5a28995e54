"""What every part of the configuration server works with: the catalog, the clock, the
change notifier and the metrics — passed in, never reached through a server object."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from configserver.metrics import ConfigMetrics


class Notifier:
    """"Something changed" (items, points, agents, jobs, alerts): waiters re-check.

    ``changed`` is the condition to wait on; ``notify()`` wakes every waiter.
    """

    def __init__(self) -> None:
        self.changed = asyncio.Condition()
        # Also tells the other configuration servers on a shared PostgreSQL catalog
        # (configserver/pgnotify.py); None: this server is alone.
        self.publish: Callable[[], Awaitable[None]] | None = None

    async def notify(self) -> None:
        await self.notify_local()
        if self.publish is not None:
            await self.publish()

    async def notify_local(self) -> None:
        """Wake this server's waiters only (a change another server announced)."""
        async with self.changed:
            self.changed.notify_all()

    async def wait(self, timeout: float) -> None:
        """Until the next ``notify()`` or ``timeout`` seconds, whichever comes first."""
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait()
        except TimeoutError:
            pass


@dataclass(frozen=True)
class Core:
    """The catalog (engine and sessions), the clock (UNIX seconds; tests inject one),
    the change notifier and the metrics."""

    database: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    clock: Callable[[], float]
    notifier: Notifier
    metrics: ConfigMetrics

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.database.dialect.name

    async def notify(self) -> None:
        await self.notifier.notify()
