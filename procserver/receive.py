"""Pieces of a session's receive loop (``Session.receive``) that stand on their own.

``FrameRun`` gathers the checked BLOCK/ZERO frames not yet handed to the cache writer,
merging frames that lie back to back in one receive buffer into one view. When a
session ends, letting go of its cycle (sealing what arrived, or aborting) runs through
``uncancellable`` (bounded work that must finish even if the session's task is
cancelled meanwhile) and ``quietly`` (stopping the cache writer must not raise).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any

import structlog

from procserver.framestream import RawFrame

log = structlog.get_logger("procserver.session")


class FrameRun:
    """Whole, checked frames not yet handed to the cache writer (adjacent ones merged)."""

    __slots__ = ("buf", "data", "end", "frames", "last", "nbytes", "reserved", "start",
                 "views_")

    def __init__(self, last: tuple[int, int] | None) -> None:
        self.last = last
        self.views_: list[memoryview] = []
        self.buf: bytearray | None = None
        self.start = self.end = self.nbytes = self.frames = self.data = 0
        self.reserved = False  # its cache space is accounted already

    def add(self, f: RawFrame, pos: tuple[int, int], data_len: int) -> None:
        if f.buf is self.buf and f.start == self.end:
            self.end = f.end
        else:
            if self.buf is not None:
                self.views_.append(memoryview(self.buf)[self.start:self.end])
            self.buf, self.start, self.end = f.buf, f.start, f.end
        self.nbytes += f.size
        self.frames += 1
        self.data += data_len
        if self.last is None or pos > self.last:
            self.last = pos

    def views(self) -> list[memoryview]:
        if self.buf is not None:
            self.views_.append(memoryview(self.buf)[self.start:self.end])
            self.buf = None
        return self.views_

    def clear(self) -> None:
        self.views_ = []
        self.buf = None
        self.nbytes = self.frames = self.data = 0
        self.reserved = False


async def uncancellable(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end even if the caller is cancelled; then re-raise that."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


async def quietly(aw: Awaitable[None]) -> None:
    """Await ``aw`` (a cache writer's ``stop``); a failure is logged, not raised."""
    try:
        await aw
    except Exception as e:
        log.warning("cache_writer_stop_failed", error=str(e) or type(e).__name__)
