"""Prometheus instrumentation as a store wrapper: operations, bytes and latency."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from vault.errors import NotFoundError, TransientStoreError
from vault.store.protocol import BlobInfo, BlobStore
from vault.store.wrapper import StoreWrapper

T = TypeVar("T")


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "siterecovery_vault_store_"
        self.ops = Counter(p + "operations", "Blob store operations by outcome",
                           ["op", "outcome"], registry=registry)
        self.bytes = Counter(p + "bytes", "Bytes moved to or from the blob store", ["op"],
                             registry=registry)
        self.seconds = Histogram(p + "operation_seconds", "Blob store operation latency",
                                 ["op"], registry=registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))


class InstrumentedStore(StoreWrapper):
    """Counts every operation by outcome, its bytes and its latency in ``metrics``."""

    def __init__(self, inner: BlobStore, metrics: StoreMetrics) -> None:
        super().__init__(inner)
        self.m = metrics

    async def _timed(self, op: str, aw: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            result = await aw
        except NotFoundError:
            self.m.ops.labels(op, "not_found").inc()
            raise
        except TransientStoreError:
            self.m.ops.labels(op, "transient_error").inc()
            raise
        except Exception:
            self.m.ops.labels(op, "error").inc()
            raise
        self.m.ops.labels(op, "ok").inc()
        self.m.seconds.labels(op).observe(time.perf_counter() - start)
        return result

    async def put(self, name: str, data: bytes | bytearray) -> None:
        await self._timed("put", self.inner.put(name, data))
        self.m.bytes.labels("put").inc(len(data))

    async def put_file(self, name: str, fd: int, length: int) -> None:
        await self._timed("put", self.inner.put_file(name, fd, length))  # a put, to its reader
        self.m.bytes.labels("put").inc(length)

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = await self._timed("get", self.inner.get(name, offset, length))
        self.m.bytes.labels("get").inc(len(data))
        return data

    async def stat(self, name: str) -> BlobInfo:
        return await self._timed("stat", self.inner.stat(name))

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        self.m.ops.labels("list", "ok").inc()
        async for info in self.inner.list(prefix):
            yield info

    async def delete(self, name: str) -> None:
        await self._timed("delete", self.inner.delete(name))
