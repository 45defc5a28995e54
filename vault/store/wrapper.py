"""``StoreWrapper``: the base of every store wrapper (retry, limit, metrics, faults, …)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from vault.store.protocol import BlobInfo, BlobStore, read_file_part


class StoreWrapper:
    """A ``BlobStore`` that passes every operation to ``inner`` unchanged.

    A wrapper subclasses it and overrides only the operations it changes; ``url`` is
    the inner store's unless the subclass sets its own. Errors are the inner store's.
    """

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.url = inner.url

    async def put(self, name: str, data: bytes | bytearray) -> None:
        await self.inner.put(name, data)

    async def put_file(self, name: str, fd: int, length: int) -> None:
        """The file read whole and handed to ``self.put``, so a wrapper that overrides
        only ``put`` sees every write; a wrapper that passes writes through unread
        overrides this too, to keep a file put a part at a time."""
        await self.put(name, await asyncio.to_thread(read_file_part, fd, 0, length))

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self.inner.get(name, offset, length)

    async def stat(self, name: str) -> BlobInfo:
        return await self.inner.stat(name)

    def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        return self.inner.list(prefix)

    async def delete(self, name: str) -> None:
        await self.inner.delete(name)

    async def setup(self) -> None:
        await self.inner.setup()

    async def server_time(self) -> float | None:
        return await self.inner.server_time()

    async def close(self) -> None:
        await self.inner.close()
