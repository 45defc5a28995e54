"""A cycle's journal in the cache: the block-map changes of its checkpoints.

The uploader appends a checkpoint's ``(disk, block, block id)`` entries, fixed-size
records (``JREC``), and fsyncs them before it deletes the checkpoint's segments; a
restarted process server replays them and goes on after the last checkpoint.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from procserver.cache import fsync_or_die

JREC = struct.Struct("<HQ32s")
Entry = tuple[int, int, bytes]  # (disk, block number, block id)
# A resumed cycle's journal is replayed this many entries at a time (10 MB of them).
REPLAY_BATCH = 1 << 18


def append_journal(path: Path, entries: list[Entry]) -> None:
    """Append ``entries`` to the journal at ``path`` and fsync it (blocking)."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        data = memoryview(b"".join(JREC.pack(d, n, bid) for d, n, bid in entries))
        while data:  # a nearly full disk takes part of it (a torn tail is cut on read)
            data = data[os.write(fd, data):]
        fsync_or_die(fd, str(path))
    finally:
        os.close(fd)
    if new:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            fsync_or_die(dfd, str(path.parent))
        finally:
            os.close(dfd)


def cut_journal(path: Path) -> int:
    """How many whole entries the journal at ``path`` holds (0 if it does not exist); a
    torn tail is cut off first (blocking)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return 0
    whole = size - size % JREC.size
    if whole != size:
        # A torn append was never fsynced, so its segment was never deleted and will
        # be processed again: drop the tail so later appends stay aligned.
        os.truncate(path, whole)
    return whole // JREC.size


def read_journal(path: Path, start: int, count: int) -> list[Entry]:
    """Entries ``start`` to ``start + count`` of the journal at ``path`` (blocking): a
    resumed cycle replays its journal a batch at a time, never the whole of it."""
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), count * JREC.size, start * JREC.size)
    if len(data) != count * JREC.size:
        raise OSError(f"{path}: the journal ends before entry {start + count}")
    return list(JREC.iter_unpack(data))


async def replay_journal(path: Path, apply: Callable[[list[Entry]], Awaitable[None]],
                         batch: int = REPLAY_BATCH) -> int:
    """Hand the journal at ``path`` to ``apply`` ``batch`` entries at a time, in order (a
    torn tail cut first); return how many entries it holds. A resumed cycle's journal is
    never held whole."""
    total = await asyncio.to_thread(cut_journal, path)
    for lo in range(0, total, batch):
        await apply(await asyncio.to_thread(read_journal, path, lo, min(batch, total - lo)))
    return total
