"""Concurrency-limit wrapper: at most ``limit`` operations in flight on the inner store."""

from __future__ import annotations

import asyncio

from vault.store.protocol import BlobInfo, BlobStore
from vault.store.wrapper import StoreWrapper


class LimitStore(StoreWrapper):
    """At most ``limit`` operations in flight against the inner store.

    A listing is not limited: its items are consumed between the caller's other
    operations, and a slot held across them could starve those."""

    def __init__(self, inner: BlobStore, limit: int = 8) -> None:
        super().__init__(inner)
        self._sem = asyncio.Semaphore(limit)

    async def put(self, name: str, data: bytes | bytearray) -> None:
        async with self._sem:
            await self.inner.put(name, data)

    async def put_file(self, name: str, fd: int, length: int) -> None:
        async with self._sem:
            await self.inner.put_file(name, fd, length)

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        async with self._sem:
            return await self.inner.get(name, offset, length)

    async def stat(self, name: str) -> BlobInfo:
        async with self._sem:
            return await self.inner.stat(name)

    async def delete(self, name: str) -> None:
        async with self._sem:
            await self.inner.delete(name)

    async def server_time(self) -> float | None:
        async with self._sem:
            return await self.inner.server_time()
