"""``open_store(url)``: pick a backend by URL scheme."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from vault.errors import PermanentStoreError
from vault.local import LocalStore
from vault.memory import MemoryStore
from vault.store import BlobStore


def open_store(url: str) -> BlobStore:
    """Open the store named by ``url``.

    ``file:///path`` or a plain path selects the local-folder backend;
    ``memory://`` an in-memory store (tests only); ``fault+<url>?…`` wraps another
    store with injected faults (see faults.py).
    """
    parsed = urlparse(url)
    if parsed.scheme.startswith("fault+"):
        from vault.faults import FaultStore

        inner_url = url[len("fault+"):].split("?", 1)[0]
        q = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        return FaultStore(open_store(inner_url), hang=q.get("hang", ""),
                          fail=q.get("fail", ""), fail_times=int(q.get("fail_times", "0")),
                          corrupt_get=q.get("corrupt_get", ""))
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if not path:
            raise PermanentStoreError(f"store URL {url!r} names no folder")
        return LocalStore(path)
    if parsed.scheme == "memory":
        return MemoryStore()
    raise PermanentStoreError(
        f"unsupported store URL scheme {parsed.scheme!r} in {url!r}; use file:///path"
    )
