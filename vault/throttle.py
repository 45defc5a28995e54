"""Uploads paced by a ``common.pacing.TokenBucket`` (the process server's upload limit)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from common.pacing import TokenBucket
from vault.store import BlobInfo, BlobStore


class ThrottleStore:
    """Uploads (``put``) pass through a token bucket; everything else is untouched."""

    def __init__(self, inner: BlobStore, bucket: TokenBucket) -> None:
        self.inner, self.bucket = inner, bucket
        self.url = inner.url

    async def put(self, name: str, data: bytes) -> None:
        await self.bucket.take(len(data))
        await self.inner.put(name, data)

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self.inner.get(name, offset, length)

    async def stat(self, name: str) -> BlobInfo:
        return await self.inner.stat(name)

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        async for info in self.inner.list(prefix):
            yield info

    async def delete(self, name: str) -> None:
        await self.inner.delete(name)

    async def setup(self) -> None:
        await self.inner.setup()

    async def server_time(self) -> float | None:
        return await self.inner.server_time()

    async def close(self) -> None:
        await self.inner.close()
