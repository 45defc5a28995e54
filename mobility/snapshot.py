"""Snapshot providers: where a point's consistency label comes from (invariant 4).

A provider is an async context manager that holds the disks at one point in time
while they are read and yields the label that honestly describes the read:

- ``none``: the disks are read live; points are labelled ``inconsistent``.
- ``quiesced``: the operator guarantees nothing writes during the read (e.g. a
  stopped VM's image, or a test harness that pauses its writer): ``crash``.
- ``fsfreeze``: ``fsfreeze -f`` on each mount for the read, then ``-u``: ``crash``.
- ``script``: a user pre-script (application quiesce) before and post-script after,
  each with a timeout: ``app``; if the pre-script fails the cycle is labelled by
  the inner provider and the failure is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

import structlog

log = structlog.get_logger("mobility.snapshot")


class SnapshotProvider(Protocol):
    def hold(self) -> contextlib.AbstractAsyncContextManager[str]: ...


class NoSnapshot:
    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[str]:
        yield "inconsistent"


class Quiesced:
    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[str]:
        yield "crash"


async def _run(argv: list[str], timeout: float) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            _out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{argv[0]} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{err.decode(errors='replace').strip()}")


class FsFreeze:
    def __init__(self, mounts: list[str], timeout: float = 30.0) -> None:
        self.mounts, self.timeout = mounts, timeout

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[str]:
        frozen: list[str] = []
        try:
            for m in self.mounts:
                await _run(["fsfreeze", "--freeze", m], self.timeout)
                frozen.append(m)
            yield "crash"
        finally:
            for m in reversed(frozen):
                await _run(["fsfreeze", "--unfreeze", m], self.timeout)


class Scripts:
    def __init__(self, pre: str, post: str, timeout: float, inner: SnapshotProvider) -> None:
        self.pre, self.post, self.timeout, self.inner = pre, post, timeout, inner

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[str]:
        try:
            await _run([self.pre], self.timeout)
        except (RuntimeError, OSError) as e:
            log.warning("pre_script_failed", error=str(e))
            async with self.inner.hold() as label:
                yield label
            return
        try:
            async with self.inner.hold() as label:
                yield "app" if label != "inconsistent" else label
        finally:
            await _run([self.post], self.timeout)
