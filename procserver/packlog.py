"""The pack log: which packs this process server began to write, for which cycle.

A pack's name is random (vault/names.py): nothing in the vault says who wrote it. So
before the uploader puts a pack it appends ``<pack id> <cycle seq>`` to this file in
the data directory and fsyncs it (``record``). A pack put by a run that was killed, or
by an upload that failed before its index object was written, is then known as *ours*
and can be settled (procserver/orphans.py): adopted into the index if a cycle that will
resume still needs its blocks, deleted otherwise. Packs of other process servers are
never in it.

Entries of a cycle go once that cycle is settled (``forget``), so the file holds only
the packs of cycles still being uploaded. A torn last line (a crash in the append) is
ignored: its pack was never put, since the put comes after the fsync.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from common.fs import atomic_write, fsync_dir

_LINE = re.compile(r"^([0-9a-f]{64}) ([0-9]+)$")


class PackLog:
    """The pack log at ``path``. Thread-safe: uploads of several machines record at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, pack_id: str, cycle_seq: int) -> None:
        """Append an entry and fsync it before the pack is put (blocking)."""
        line = f"{pack_id} {cycle_seq}\n".encode()
        with self._lock:
            new = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.path.parent)

    def read(self) -> dict[str, int]:
        """Every whole entry: pack id -> cycle seq (blocking)."""
        with self._lock:
            return self._read()

    def _read(self) -> dict[str, int]:
        try:
            text = self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return {}
        out: dict[str, int] = {}
        for line in text.split("\n"):
            m = _LINE.match(line)
            if m is not None:
                out[m.group(1)] = int(m.group(2))
        return out

    def forget(self, pack_ids: set[str]) -> None:
        """Drop the entries of ``pack_ids`` (settled); the rest stays (blocking)."""
        if not pack_ids:
            return
        with self._lock:
            keep = {p: seq for p, seq in self._read().items() if p not in pack_ids}
            atomic_write(self.path, "".join(f"{p} {seq}\n" for p, seq in keep.items()))
