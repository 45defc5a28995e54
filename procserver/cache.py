"""The durable cache: HRL segment files of received frames.

A segment file is ``b"SRHRL001"`` followed by BLOCK and ZERO frames exactly as
they arrived (wire.py encoding). A segment is fsynced, with its directory,
before it is recorded as sealed; the agent is acknowledged only after every
segment of its cycle is sealed, so nothing acknowledged is lost on ``kill -9``.
A failed fsync is fatal: the process exits rather than retry (the page cache
may already have dropped the data).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from procserver.wire import Frame, FrameType, ProtocolError, decode

SEGMENT_MAGIC = b"SRHRL001"


def fsync_or_die(fd: int, what: str) -> None:
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover - exercised only by failing disks
        sys.stderr.write(f"fatal: fsync of {what} failed: {e}; exiting to protect data\n")
        os._exit(70)


class SegmentWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in seal()
        self._f.write(SEGMENT_MAGIC)
        self.size = len(SEGMENT_MAGIC)

    def append(self, head: bytes, payload: bytes) -> None:
        self._f.write(head)
        self._f.write(payload)
        self.size += len(head) + len(payload)

    def seal(self) -> None:
        """Flush, fsync the file and its directory, close. Blocking: run in a thread."""
        self._f.flush()
        fsync_or_die(self._f.fileno(), str(self.path))
        self._f.close()
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fsync_or_die(dfd, str(self.path.parent))
        finally:
            os.close(dfd)

    def discard(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


def read_segment(path: str | Path) -> Iterator[Frame]:
    """Yield the frames of a sealed segment (blocking)."""
    data = Path(path).read_bytes()
    if not data.startswith(SEGMENT_MAGIC):
        raise ProtocolError("bad_segment", f"{path} is not an HRL segment")
    pos = len(SEGMENT_MAGIC)
    view = memoryview(data)
    while pos < len(data):
        frame, used = decode(view[pos:])
        if frame.type not in (FrameType.BLOCK, FrameType.ZERO):
            raise ProtocolError("bad_segment", f"{path} holds a {frame.type.name} frame")
        yield frame
        pos += used


def cache_usage(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            try:
                total += os.stat(os.path.join(dirpath, fn)).st_size
            except FileNotFoundError:
                pass
    return total


def remove_cycle_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
