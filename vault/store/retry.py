"""Retry wrapper: transient store errors are retried with capped, jittered backoff.

Each attempt of a ``put`` sends the identical body. ``list`` resumes after the last
name it yielded, so a retried listing neither repeats nor skips objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import structlog

from common.backoff import Backoff
from vault.errors import TransientStoreError
from vault.store.protocol import BlobInfo, BlobStore
from vault.store.wrapper import StoreWrapper

T = TypeVar("T")
log = structlog.get_logger("vault.retry")


class RetryStore(StoreWrapper):
    """Retries ``TransientStoreError`` up to ``attempts`` tries in all, then raises the
    last one; every other error passes at once. ``setup`` and ``close`` are not retried."""

    def __init__(self, inner: BlobStore, *, attempts: int = 8, base: float = 0.1,
                 cap: float = 10.0) -> None:
        super().__init__(inner)
        self.attempts, self.base, self.cap = attempts, base, cap

    def _backoff(self) -> Backoff:
        return Backoff(self.base, self.cap)  # one per operation: its own count of failures

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        backoff = self._backoff()
        for attempt in range(self.attempts):
            try:
                return await op()
            except TransientStoreError as e:
                if attempt == self.attempts - 1:
                    raise
                delay = backoff.next()
                log.warning("store_retry", op=what, attempt=attempt + 1, error=str(e),
                            retry_in_seconds=round(delay, 3))
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def put(self, name: str, data: bytes | bytearray) -> None:
        await self._retry(f"put {name}", lambda: self.inner.put(name, data))

    async def put_file(self, name: str, fd: int, length: int) -> None:
        await self._retry(f"put {name}", lambda: self.inner.put_file(name, fd, length))

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self._retry(f"get {name}", lambda: self.inner.get(name, offset, length))

    async def stat(self, name: str) -> BlobInfo:
        return await self._retry(f"stat {name}", lambda: self.inner.stat(name))

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        last: str | None = None
        attempt = 0
        backoff = self._backoff()
        while True:
            try:
                async for info in self.inner.list(prefix):
                    if last is not None and info.name <= last:
                        continue
                    yield info
                    last = info.name
                return
            except TransientStoreError as e:
                if attempt == self.attempts - 1:
                    raise
                delay = backoff.next()
                attempt += 1
                log.warning("store_retry", op=f"list {prefix}", attempt=attempt, error=str(e))
                await asyncio.sleep(delay)

    async def delete(self, name: str) -> None:
        await self._retry(f"delete {name}", lambda: self.inner.delete(name))

    async def server_time(self) -> float | None:
        return await self._retry("server_time", self.inner.server_time)
