"""The process server's heap: freed memory goes back to the system.

Measured under a soak load (8 agents churning, prunes every few minutes; README "Soak
and chaos"): the Python objects a process server holds stay flat (``tracemalloc``,
about 10-20 MiB traced), yet its RSS climbed for as long as the load ran. The growth is
glibc's malloc keeping what was freed: every cycle allocates and frees hundreds of MiB
of transient buffers (block batches, zstd's output buffers, sealed packs) on the event
loop's thread and on the sealing and ``to_thread`` workers, each thread in an arena of
its own, and

- glibc raises its mmap threshold to the size of any large buffer freed (up to 32 MiB),
  so from the first cycle on the multi-MiB buffers come from the arenas' heaps instead
  of ``mmap`` and stay resident when freed;
- an arena gives memory back only from the top of its heap, never from the middle.

Two remedies, both glibc-only (elsewhere they do nothing):

- ``return_large_buffers`` (once, at start): a fixed mmap threshold of ``MMAP_THRESHOLD``
  and a fixed trim threshold of ``TRIM_THRESHOLD``. 16 MiB is above every buffer the
  data path allocates again and again (a sealed pack: ``PACK_TARGET``, 8 MiB, plus a
  frame; a frame's plaintext and its compressed output; a receive chunk), so those
  come from the arenas' heaps and are reused, never faulted in afresh; anything larger
  is a mapping of its own, unmapped when freed. An arena keeps up to ``TRIM_THRESHOLD``
  of free memory at its top instead of giving it back after every pack and taking it
  again for the next. A threshold of 2 MiB, from the soak until 2026-12-07, made every
  pack and zstd output a fresh mapping: sealing the benchmark image's packs on two
  threads cost 1.22 CPU seconds and 158 000 page faults, against 0.80 s and 9 000
  (README "Sealing without page faults"), for a peak RSS 8-10 % higher under
  ``bench_ingest.py``'s eight agents;
- ``HeapTrim``: ``malloc_trim(0)`` after a recovery point is written and after each
  checkpoint of a cycle (an initial copy hours long writes its point only at its end),
  at most once per ``interval`` seconds, on a worker thread: the free pages inside every
  arena are given back, whatever fragmentation the smaller allocations left.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter

log = structlog.get_logger("procserver")

MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 32 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
TRIM_INTERVAL = 30.0  # seconds: at most one trim this often


def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (the only one with ``malloc_trim``)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` and its trim threshold at
    ``TRIM_THRESHOLD`` (process-wide), so freed large buffers are unmapped at once and
    the data path's own buffers are reused; False where the C library is not glibc."""
    return _LIBC is not None and _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 \
        and _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def anonymous_rss() -> int:
    """Bytes of this process's anonymous memory that are resident (0 if unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def trim_heap() -> int:
    """Give the free pages of every malloc arena back to the system (blocking: run it on
    a worker thread); return how many resident bytes that released (0 without glibc)."""
    if _LIBC is None:
        return 0
    before = anonymous_rss()
    _LIBC.malloc_trim(0)
    return max(0, before - anonymous_rss())


class HeapTrim:
    """``request`` (after a point or a checkpoint) trims the heap on a worker thread, unless
    a trim ran less than ``interval`` seconds ago or runs now; counted in ``trims`` and
    ``released`` (bytes), and in ``done`` (``changed`` is notified after each)."""

    def __init__(self, spawn: Callable[[Coroutine[Any, Any, None]], object],
                 trims: Counter, released: Counter, interval: float = TRIM_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spawn, self.trims, self.released = spawn, trims, released
        self.interval, self.clock = interval, clock
        self._last: float | None = None
        self._running = False
        self.done = 0
        self.changed = asyncio.Condition()

    def request(self) -> None:
        now = self.clock()
        if _LIBC is None or self._running or (
                self._last is not None and now - self._last < self.interval):
            return
        self._running, self._last = True, now
        self.spawn(self._trim())

    async def _trim(self) -> None:
        try:
            freed = await asyncio.to_thread(trim_heap)
        finally:
            self._running = False
        self.trims.inc()
        self.released.inc(freed)
        log.debug("heap_trimmed", released_bytes=freed)
        async with self.changed:
            self.done += 1
            self.changed.notify_all()
