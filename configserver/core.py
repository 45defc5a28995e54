"""What every part of the configuration server works with: the catalog, the clock, the
change notifier and the metrics — passed in, never reached through a server object."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
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

    @contextlib.asynccontextmanager
    async def watching(self, name: str) -> AsyncIterator[asyncio.Event]:
        """An event set by every change while the block runs, for a background loop that
        clears it before a pass (a change during the pass means one more)."""
        dirty = asyncio.Event()

        async def watch() -> None:
            async with self.changed:
                while True:
                    await self.changed.wait()
                    dirty.set()

        watcher = asyncio.create_task(watch(), name=name)
        try:
            yield dirty
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def next_pass(dirty: asyncio.Event, gap: float, wait: float) -> None:
    """Between two passes of a background loop: ``gap`` seconds whatever happens (a burst
    of changes costs one pass per gap; what changed meanwhile stays marked in ``dirty``),
    then until a change or ``wait`` seconds in all."""
    await asyncio.sleep(gap)
    if wait > gap:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait - gap):
                await dirty.wait()


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
