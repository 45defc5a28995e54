"""In-memory backend, for unit tests only."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

from vault.errors import NotFoundError, PermanentStoreError
from vault.store.protocol import BlobInfo, check_name, read_file_part


class MemoryStore:
    def __init__(self) -> None:
        self.url = "memory://"
        self.objects: dict[str, bytes] = {}
        self.versions: dict[str, str] = {}  # a new one at every write of a name
        self._writes = itertools.count(1)

    def _put(self, name: str, data: bytes) -> None:
        self.objects[name], self.versions[name] = data, str(next(self._writes))

    async def put(self, name: str, data: bytes | bytearray) -> None:
        self._put(check_name(name), bytes(data))

    async def put_file(self, name: str, fd: int, length: int) -> None:
        self._put(check_name(name), read_file_part(fd, 0, length))

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            data = self.objects[check_name(name)]
        except KeyError:
            raise NotFoundError(f"object {name!r} not found") from None
        end = len(data) if length is None else offset + length
        if offset < 0 or end > len(data) or end < offset:
            raise PermanentStoreError(f"range {offset}+{length} outside object {name!r}")
        return data[offset:end]

    async def stat(self, name: str) -> BlobInfo:
        try:
            data = self.objects[check_name(name)]
            return BlobInfo(name, len(data), self.versions[name])
        except KeyError:
            raise NotFoundError(f"object {name!r} not found") from None

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        for name in sorted(n for n in self.objects if n.startswith(prefix)):
            yield BlobInfo(name, len(self.objects[name]), self.versions[name])

    async def delete(self, name: str) -> None:
        self.objects.pop(check_name(name), None)
        self.versions.pop(name, None)

    async def setup(self) -> None:
        return None

    async def server_time(self) -> float | None:
        return None  # memory has no clock of its own

    async def close(self) -> None:
        return None
