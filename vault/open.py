"""``open_store(url)``: pick a backend by URL scheme and wrap it."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from vault.errors import PermanentStoreError
from vault.instrument import InstrumentedStore, StoreMetrics
from vault.local import LocalStore
from vault.memory import MemoryStore
from vault.retry import LimitStore, RetryStore
from vault.store import BlobStore

MAX_CONCURRENCY = 16


def open_backend(url: str) -> BlobStore:
    """The bare backend for ``url``, with no wrappers.

    - ``file:///path`` or a plain path: the local-folder backend;
    - ``azure://CONTAINER[/PREFIX]?…``: Azure Blob (see azure.py for credentials);
    - ``memory://``: an in-memory store (tests only);
    - ``fault+<url>?…``: another store with injected faults (see faults.py).
    """
    parsed = urlparse(url)
    if parsed.scheme.startswith("fault+"):
        from vault.faults import FaultStore

        inner_url = url[len("fault+"):].split("?", 1)[0]
        q = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        return FaultStore(open_backend(inner_url), hang=q.get("hang", ""),
                          fail=q.get("fail", ""), fail_times=int(q.get("fail_times", "0")),
                          corrupt_get=q.get("corrupt_get", ""),
                          crash_after=int(q.get("crash_after", "0")))
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if not path:
            raise PermanentStoreError(f"store URL {url!r} names no folder")
        return LocalStore(path)
    if parsed.scheme == "azure":
        from vault.azure import AzureBlobStore

        return AzureBlobStore.from_url(url)
    if parsed.scheme == "memory":
        return MemoryStore()
    raise PermanentStoreError(
        f"unsupported store URL {url!r}; use file:///path or azure://CONTAINER/PREFIX"
    )


def open_store(url: str, metrics: StoreMetrics | None = None) -> BlobStore:
    """The store for ``url`` with retries and a concurrency limit around it, and
    Prometheus instrumentation of every attempt when ``metrics`` is given."""
    store = open_backend(url)
    if metrics is not None:
        store = InstrumentedStore(store, metrics)
    return RetryStore(LimitStore(store, MAX_CONCURRENCY))
