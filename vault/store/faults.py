"""Fault injection as a store wrapper (tests and drills; never on by default).

Selected by URL: ``fault+file:///path?hang=packs/&fail=index/&fail_times=3`` wraps
the inner store and

- ``hang=PREFIX``: ``put`` of a name with that prefix blocks until cancelled;
- ``fail=PREFIX``: ``put`` of such a name raises ``TransientStoreError``
  (``fail_times`` times, then succeeds; forever when 0 or absent);
- ``corrupt_get=PREFIX``: ``get`` of such a name returns the data with one bit flipped;
- ``crash_after=N``: the process dies (``os._exit(137)``, as under ``kill -9``) just
  before its N-th mutating operation (put or delete) — a deterministic kill point;
- ``crash_delete=PREFIX``: the process dies the same way just before it deletes a name
  with that prefix (``leases/``: right after a process server recorded a point uploaded).
"""

from __future__ import annotations

import asyncio
import os

from vault.errors import TransientStoreError
from vault.store.protocol import BlobStore
from vault.store.wrapper import StoreWrapper


class FaultStore(StoreWrapper):
    def __init__(self, inner: BlobStore, *, hang: str = "", fail: str = "",
                 fail_times: int = 0, corrupt_get: str = "", crash_after: int = 0,
                 crash_delete: str = "") -> None:
        super().__init__(inner)
        self.url = "fault+" + inner.url
        self.hang, self.fail, self.corrupt_get = hang, fail, corrupt_get
        self.fail_times = fail_times
        self.failures = 0
        self.crash_after, self.crash_delete = crash_after, crash_delete
        self.mutations = 0

    def _maybe_crash(self) -> None:
        self.mutations += 1
        if self.crash_after and self.mutations >= self.crash_after:
            os._exit(137)

    async def put(self, name: str, data: bytes | bytearray) -> None:
        await self._before_put(name)
        await self.inner.put(name, data)

    async def put_file(self, name: str, fd: int, length: int) -> None:
        await self._before_put(name)
        await self.inner.put_file(name, fd, length)

    async def _before_put(self, name: str) -> None:
        self._maybe_crash()
        if self.hang and name.startswith(self.hang):
            await asyncio.Event().wait()
        if self.fail and name.startswith(self.fail) and (
                self.fail_times == 0 or self.failures < self.fail_times):
            self.failures += 1
            raise TransientStoreError(f"injected failure writing {name!r}")

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = await self.inner.get(name, offset, length)
        if self.corrupt_get and name.startswith(self.corrupt_get) and data:
            b = bytearray(data)
            b[len(b) // 2] ^= 0x01
            return bytes(b)
        return data

    async def delete(self, name: str) -> None:
        self._maybe_crash()
        if self.crash_delete and name.startswith(self.crash_delete):
            os._exit(137)
        await self.inner.delete(name)
