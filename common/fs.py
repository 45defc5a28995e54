"""Durable local file writes: whole or not at all, across a crash.

``atomic_write`` replaces a file: it writes a temporary file beside it, fsyncs it,
renames it over the target and fsyncs the directory (so the rename itself is
durable). ``create_exclusive`` writes a new file that must not exist yet, fsynced
with its directory. Used for every small state file the daemons keep (agent state,
trust lists, policies, key files and slots, agent configs, sealed secrets).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

#: what a file is written from: text (as UTF-8) or any buffer of bytes, written from the
#: buffer itself (a large one, a memory map included, is never copied)
Data = str | bytes | bytearray | memoryview | mmap.mmap


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, raw: bytes | bytearray | memoryview | mmap.mmap, flags: int,
                mode: int) -> None:
    """Open ``path`` with ``flags``, write ``raw``, fsync, close; remove it on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, mode)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _raw(data: Data) -> bytes | bytearray | memoryview | mmap.mmap:
    return data.encode() if isinstance(data, str) else data


def atomic_write(path: str | os.PathLike[str], data: Data, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8, a buffer from itself);
    the file gets ``mode``."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    _write_file(tmp, _raw(data), os.O_TRUNC, mode)
    try:
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def create_exclusive(path: str | os.PathLike[str], data: Data, mode: int = 0o600) -> None:
    """Create ``path`` holding ``data``; ``FileExistsError`` if it exists (nothing changed).

    The file and its directory are fsynced before returning, so a crash right after
    cannot lose the new file. A failed write removes the partial file.
    """
    p = Path(path)
    _write_file(p, _raw(data), os.O_EXCL, mode)
    fsync_dir(p.parent)
