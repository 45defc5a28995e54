"""The process server's shared lock on its vault, held only while uploads write.

One lock object (vault/locks.py) for the whole process server: the first upload that
is about to write takes it, the last one that stops writing lets it go. An upload waits
for its cycle's next segment without it, so a prune (exclusive) runs between the
segments of a cycle in progress; what such a cycle already wrote is kept by its lease
(vault/locks.py, procserver/cycleupload.py). Waits for the lock and acquisitions go to
the metrics, by mode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from procserver.metrics import ProcMetrics
from procserver.vaultaccess import VaultAccess
from vault.locks import Lock, acquire

log = structlog.get_logger("procserver.vaultlock")
# How long an upload waits for the lock (a prune or rebuild-index holds it) before the
# attempt fails and is retried with back-off.
LOCK_WAIT = 600.0
MODE = "shared"


class SharedVaultLock:
    """Reference-counted holds on one shared lock of ``vaults``' vault."""

    def __init__(self, vaults: VaultAccess, metrics: ProcMetrics,
                 wait: float = LOCK_WAIT) -> None:
        self.vaults, self.metrics, self.wait = vaults, metrics, wait
        self._mutex = asyncio.Lock()  # one acquisition or release at a time
        self._lock: Lock | None = None
        self._holds = 0

    @property
    def held(self) -> bool:
        return self._lock is not None

    @asynccontextmanager
    async def hold(self, purpose: str) -> AsyncIterator[None]:
        """Hold the shared lock for the block (taken now if no other upload holds it)."""
        await self._enter(purpose)
        try:
            yield
        finally:
            await self._exit()

    async def _enter(self, purpose: str) -> None:
        async with self._mutex:
            if self._lock is None:
                started = time.monotonic()
                self.metrics.vault_lock_waiting.inc()
                try:
                    self._lock = await acquire(self.vaults.vault, MODE, purpose,
                                               wait=self.wait)
                finally:
                    self.metrics.vault_lock_waiting.dec()
                    self.metrics.vault_lock_wait_seconds.labels(MODE).observe(
                        time.monotonic() - started)
                self.metrics.vault_lock_acquisitions.labels(MODE).inc()
            self._holds += 1

    async def _exit(self) -> None:
        # Shielded: a cancelled holder still deletes the lock object (else it blocks a
        # prune until it expires).
        await asyncio.shield(self._release())

    async def _release(self) -> None:
        async with self._mutex:
            self._holds -= 1
            if self._holds or self._lock is None:
                return
            lock, self._lock = self._lock, None
            try:
                await lock.release()
            except Exception as e:  # it expires by itself; a prune may wait until then
                log.warning("vault_lock_release_failed", error=str(e),
                            error_type=type(e).__name__,
                            hint="the lock expires by itself within 30 minutes")
