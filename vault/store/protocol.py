"""The ``BlobStore`` protocol every storage backend implements.

Names are ``/``-separated ASCII paths of ``[a-z0-9._-]`` segments, validated once
here (:func:`check_name`) rather than in each backend.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vault.errors import PermanentStoreError

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$")


def read_file_part(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes of ``fd`` from ``offset`` (``pread``); an error if the file is
    shorter."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise PermanentStoreError(f"the file to put ends before byte {offset + length}")
    return data


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise ``PermanentStoreError``."""
    if len(name) > 512 or not _NAME.match(name) or ".." in name:
        raise PermanentStoreError(f"invalid object name {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class BlobInfo:
    name: str
    size: int
    #: changes whenever the object is written (Azure's ETag; a file's inode, mtime and
    #: ctime; a counter in memory): the same name and version, the same bytes. Empty
    #: where a backend cannot tell (a reader then reads the object again).
    version: str = ""


@runtime_checkable
class BlobStore(Protocol):
    """An object store with whole-object atomic writes.

    Contracts every backend keeps:

    - ``put`` makes the object visible atomically: a reader sees the old object,
      no object, or the whole new one, never a part. After ``put`` returns the
      object is durable. ``data`` may be a ``bytearray`` (a sealed pack is built in
      one); a backend that keeps it copies it.
    - ``put_file`` is ``put`` of the first ``length`` bytes of the open file ``fd``,
      read with ``pread`` (the file's position is not used or moved, and it is not
      closed; each attempt reads it again): an object too large to hold in memory (a
      block map of a large disk) is put from a file, a part at a time.
    - ``get`` returns ``length`` bytes from ``offset`` (to the end when ``length``
      is ``None``); raises ``NotFoundError`` if the object does not exist and
      ``PermanentStoreError`` if the range lies outside it.
    - ``stat`` raises ``NotFoundError`` for a missing object.
    - ``list`` yields the objects whose name starts with ``prefix``, sorted by name.
    - ``delete`` is idempotent: deleting a missing object succeeds.
    - ``setup`` makes the store ready to hold a vault (creates the container); idempotent.
    - ``server_time`` is the storage service's clock (UNIX seconds, from the HTTP ``Date``
      header of a cheap request), or ``None`` when the store has no clock of its own (a
      local folder, memory). Registration compares it with this machine's clock.

    Errors: ``NotFoundError`` for a missing object, ``TransientStoreError`` when a
    retry may succeed, ``PermanentStoreError`` otherwise.
    """

    url: str

    async def put(self, name: str, data: bytes | bytearray) -> None: ...

    async def put_file(self, name: str, fd: int, length: int) -> None: ...

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    async def stat(self, name: str) -> BlobInfo: ...

    def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]: ...

    async def delete(self, name: str) -> None: ...

    async def setup(self) -> None: ...

    async def server_time(self) -> float | None: ...

    async def close(self) -> None: ...
