"""One process server per data directory: an exclusive ``flock`` on ``DATA_DIR/lock``.

Two process servers on one data directory would share its cache, its bookkeeping and
its pack log, and the one starting would settle the other's packs in flight as orphans
(procserver/orphans.py). The lock is taken before anything else at start and held until
the daemon stops; the kernel drops it when the process dies (kill -9 included), so a
crash never leaves it behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirBusyError(OSError):
    """Another live process server uses the data directory."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (blocking I/O, no waiting); ``DataDirBusyError`` naming the holder's
        pid if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirBusyError(
                f"another process server (pid {holder}) uses the data directory "
                f"{self.path.parent}; stop it first, or give this one its own data_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
