"""Uploads paced by a ``common.pacing.TokenBucket`` (the process server's upload limit)."""

from __future__ import annotations

from common.pacing import TokenBucket
from vault.store.protocol import BlobStore
from vault.store.wrapper import StoreWrapper


class ThrottleStore(StoreWrapper):
    """Uploads (``put``, ``put_file``) pass through a token bucket; everything else is
    untouched."""

    def __init__(self, inner: BlobStore, bucket: TokenBucket) -> None:
        super().__init__(inner)
        self.bucket = bucket

    async def put(self, name: str, data: bytes | bytearray) -> None:
        await self.bucket.take(len(data))
        await self.inner.put(name, data)

    async def put_file(self, name: str, fd: int, length: int) -> None:
        await self.bucket.take(length)
        await self.inner.put_file(name, fd, length)
