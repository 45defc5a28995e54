"""Scratch files with no name: nothing is left behind when they are closed, or when the
process dies, even by ``kill -9``.

``scratch_file(where)`` opens a new file in directory ``where`` (default: the system's
temporary directory) with ``O_TMPFILE``; on a filesystem without it, a named file
unlinked at once (a crash between the two leaves a ``.siterecovery-scratch-*`` file).
Used for what a process spills past a memory budget (a cycle's block-map changes, a
map being written).
"""

from __future__ import annotations

import errno
import os
import tempfile

_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)


def scratch_file(where: str | os.PathLike[str] | None = None) -> int:
    """A read-write descriptor of a new, nameless file in ``where``."""
    folder = os.fspath(where) if where is not None else tempfile.gettempdir()
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        if e.errno not in _NO_TMPFILE:
            raise
    fd, name = tempfile.mkstemp(prefix=".siterecovery-scratch-", dir=folder)
    os.unlink(name)
    return fd


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write the whole of ``data`` at ``fd``'s position."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
