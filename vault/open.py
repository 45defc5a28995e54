"""``open_store(url)``: pick a backend by URL scheme."""

from __future__ import annotations

from urllib.parse import urlparse

from vault.errors import PermanentStoreError
from vault.local import LocalStore
from vault.memory import MemoryStore
from vault.store import BlobStore


def open_store(url: str) -> BlobStore:
    """Open the store named by ``url``.

    ``file:///path`` or a plain path selects the local-folder backend;
    ``memory://`` an in-memory store (tests only).
    """
    parsed = urlparse(url)
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
