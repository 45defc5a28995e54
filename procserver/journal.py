"""A cycle's journal in the cache: the block-map changes of its checkpoints.

The uploader appends a checkpoint's ``(disk, block, block id)`` entries, fixed-size
records (``JREC``), and fsyncs them before it deletes the checkpoint's segments; a
restarted process server replays them and goes on after the last checkpoint.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from procserver.cache import fsync_or_die

JREC = struct.Struct("<HQ32s")


def append_journal(path: Path, entries: list[tuple[int, int, bytes]]) -> None:
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


def read_journal(path: Path) -> list[tuple[int, int, bytes]]:
    """The whole entries of the journal at ``path`` (none if it does not exist); a torn
    tail is cut off (blocking)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    whole = len(data) - len(data) % JREC.size
    if whole != len(data):
        # A torn append was never fsynced, so its segment was never deleted and will
        # be processed again: drop the tail so later appends stay aligned.
        os.truncate(path, whole)
    return [JREC.unpack_from(data, o) for o in range(0, whole, JREC.size)]
