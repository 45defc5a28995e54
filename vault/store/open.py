"""``open_store(url)``: pick a backend by URL scheme and wrap it, in one place."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from common.pacing import TokenBucket
from vault.errors import PermanentStoreError
from vault.store.faults import FaultStore
from vault.store.instrument import InstrumentedStore, StoreMetrics
from vault.store.limit import LimitStore
from vault.store.local import LocalStore
from vault.store.memory import MemoryStore
from vault.store.protocol import BlobStore
from vault.store.retry import RetryStore
from vault.store.throttle import ThrottleStore

MAX_CONCURRENCY = 16
RETRY_ATTEMPTS = 8


def open_backend(url: str) -> BlobStore:
    """The bare backend for ``url``, with no wrappers.

    - ``file:///path`` or a plain path: the local-folder backend;
    - ``azure://CONTAINER[/PREFIX]?…``: Azure Blob (see azure.py for credentials);
    - ``memory://``: an in-memory store (tests only);
    - ``fault+<url>?…``: another store with injected faults (see faults.py).

    Raises ``PermanentStoreError`` for a URL no backend takes.
    """
    parsed = urlparse(url)
    if parsed.scheme.startswith("fault+"):
        inner_url = url[len("fault+"):].split("?", 1)[0]
        q = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        return FaultStore(open_backend(inner_url), hang=q.get("hang", ""),
                          fail=q.get("fail", ""), fail_times=int(q.get("fail_times", "0")),
                          corrupt_get=q.get("corrupt_get", ""),
                          crash_after=int(q.get("crash_after", "0")),
                          crash_delete=q.get("crash_delete", ""))
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if not path:
            raise PermanentStoreError(f"store URL {url!r} names no folder")
        return LocalStore(path)
    if parsed.scheme == "azure":
        # Not a cycle: the Azure SDK takes about half a second to import, and only
        # azure:// vaults should pay for it (every CLI command opens a store).
        from vault.store.azure import AzureBlobStore

        return AzureBlobStore.from_url(url)
    if parsed.scheme == "memory":
        return MemoryStore()
    raise PermanentStoreError(
        f"unsupported store URL {url!r}; use file:///path or azure://CONTAINER/PREFIX"
    )


def open_store(url: str, metrics: StoreMetrics | None = None, *,
               upload_bucket: TokenBucket | None = None,
               attempts: int = RETRY_ATTEMPTS) -> BlobStore:
    """The store for ``url`` with its wrappers, outermost first:

    - uploads paced by ``upload_bucket``, when given (the process server's limit);
    - retries of transient errors, ``attempts`` tries in all;
    - at most ``MAX_CONCURRENCY`` operations in flight;
    - Prometheus instrumentation of every attempt, when ``metrics`` is given.
    """
    store = open_backend(url)
    if metrics is not None:
        store = InstrumentedStore(store, metrics)
    store = RetryStore(LimitStore(store, MAX_CONCURRENCY), attempts=attempts)
    if upload_bucket is not None:
        store = ThrottleStore(store, upload_bucket)
    return store
