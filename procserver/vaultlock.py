"""The process server's shared lock on its vault, held only while uploads write.

One lock object (vault/locks.py) for the whole process server: the first upload that
is about to write takes it, the last one that stops writing lets it go. An upload waits
for its cycle's next segment without it, so a prune (exclusive) runs between the
segments of a cycle in progress; what such a cycle already wrote is kept by its lease
(vault/locks.py, procserver/cycleupload.py). Waits for the lock and acquisitions go to
the metrics, by mode.

Writers are preferred: while the lock is held, its vault is looked at every
``poll`` seconds for an exclusive contender (``vault.locks.exclusive_waiting``: a
prune's intent). From then on the lock *yields*: no new hold joins it (a new one waits
until it is gone, then takes a new lock, which waits for the exclusive holder to end),
and the uploads holding it let go at their next checkpoint (``yielding``,
procserver/cycleupload.py). So uploads that never pause still let a prune in within
about ``poll`` seconds plus one checkpoint of each upload in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from procserver.metrics import ProcMetrics
from procserver.vaultaccess import VaultAccess
from vault.locks import Lock, acquire, exclusive_waiting

log = structlog.get_logger("procserver.vaultlock")
# How long an upload waits for the lock (a prune or rebuild-index holds it) before the
# attempt fails and is retried with back-off.
LOCK_WAIT = 600.0
# How often a held lock looks for an exclusive contender (one listing of the locks).
POLL = 2.0
MODE = "shared"


class SharedVaultLock:
    """Reference-counted holds on one shared lock of ``vaults``' vault."""

    def __init__(self, vaults: VaultAccess, metrics: ProcMetrics,
                 wait: float = LOCK_WAIT, poll: float = POLL) -> None:
        self.vaults, self.metrics, self.wait, self.poll = vaults, metrics, wait, poll
        self._mutex = asyncio.Lock()  # one acquisition or release at a time
        self._lock: Lock | None = None
        self._holds = 0
        self._yielding = False
        self._gone = asyncio.Event()  # set while no lock is held
        self._gone.set()
        self._watch: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    @property
    def yielding(self) -> bool:
        """An exclusive contender waits: holders let go at their next checkpoint."""
        return self._yielding

    @asynccontextmanager
    async def hold(self, purpose: str) -> AsyncIterator[None]:
        """Hold the shared lock for the block (taken now if no other upload holds it;
        after it is gone if it yields to an exclusive contender)."""
        await self._enter(purpose)
        try:
            yield
        finally:
            await self._exit()

    async def _enter(self, purpose: str) -> None:
        while True:
            if self._yielding:
                await self._gone.wait()
            async with self._mutex:
                if self._lock is not None and self._yielding:
                    continue  # it went on yielding meanwhile: wait until it is gone
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
                    self._gone.clear()
                    self._watch = asyncio.create_task(self._look(self._lock),
                                                      name="vault-lock-watch")
                self._holds += 1
                return

    async def _look(self, lock: Lock) -> None:
        """While ``lock`` is held: yield once an exclusive contender shows up."""
        while self._lock is lock:
            await asyncio.sleep(self.poll)
            try:
                other = await exclusive_waiting(self.vaults.vault)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store hiccups: look again next time
                log.warning("vault_lock_watch_failed", error=str(e),
                            error_type=type(e).__name__)
                continue
            if other is not None and self._lock is lock:
                self._yielding = True
                log.info("vault_lock_yielding", holder=other.holder, purpose=other.purpose,
                         holds=self._holds)
                return

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
            watch, self._watch = self._watch, None
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            try:
                await lock.release()
            except Exception as e:  # it expires by itself; a prune may wait until then
                log.warning("vault_lock_release_failed", error=str(e),
                            error_type=type(e).__name__,
                            hint="the lock expires by itself within 30 minutes")
            finally:
                self._yielding = False
                self._gone.set()
