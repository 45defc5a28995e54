"""``SortedSet``: a set of fixed-size byte strings within a memory budget.

Records are gathered in memory; past the budget the gathered ones are sorted and written
to a run file in a temporary directory of their own, and iterating merges the runs
(``heapq.merge``). At most ``FAN_IN`` files are open at once: ``FAN_IN`` runs of one
level are merged into one run of the next as soon as they are written, so a record is
rewritten once per level (a logarithm of the runs, base ``FAN_IN``). Iteration yields
every record once, in byte order, and may be repeated. The directory
(``siterecovery-sort-*`` in ``temp_dir``, or the system's temporary directory) is
removed by ``close``; one that a kill left behind is garbage that no later run reads.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self

RECORD_COST = 110  # bytes a record takes in memory (a bytes object and a set slot)
FAN_IN = 64
_READ = 64 << 10  # bytes read from a run at once


class SortedSet:
    def __init__(self, record: int, memory: int, *,
                 temp_dir: str | os.PathLike[str] | None = None
                 ) -> None:
        self.record = record
        self.limit = max(16, memory // RECORD_COST)  # records held before a spill
        self._temp_dir = temp_dir
        self._dir: Path | None = None
        self._runs: list[tuple[int, Path]] = []  # (level, file), levels never increasing
        self._mem: set[bytes] = set()
        self.spilled = 0  # runs written (for tests and reports)

    def add(self, rec: bytes) -> None:
        self._mem.add(rec)
        if len(self._mem) >= self.limit:
            self._spill()

    def update(self, recs: Iterable[bytes]) -> None:
        mem, limit = self._mem, self.limit
        for rec in recs:
            mem.add(rec)
            if len(mem) >= limit:
                self._spill()

    def _spill(self) -> None:
        if not self._mem:
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="siterecovery-sort-", dir=self._temp_dir))
        path = self._dir / f"run-{self.spilled:06d}"
        with open(path, "wb") as f:
            f.write(b"".join(sorted(self._mem)))
        self._mem.clear()
        self._runs.append((0, path))
        self.spilled += 1
        # FAN_IN runs of one level (the last ones: levels never increase along the list)
        # become one of the next level, which may complete a group of that level in turn.
        while len(self._runs) >= FAN_IN and self._runs[-FAN_IN][0] == self._runs[-1][0]:
            self._merge_last(FAN_IN, self._runs[-1][0] + 1)

    def _merge_last(self, count: int, level: int) -> None:
        """Merge the last ``count`` runs into one of ``level``."""
        assert self._dir is not None
        group = self._runs[-count:]
        merged = self._dir / f"run-{self.spilled:06d}-{level}"
        self.spilled += 1
        with open(merged, "wb") as f:
            buf: list[bytes] = []
            for rec in _unique(heapq.merge(*(self._read(p) for _, p in group))):
                buf.append(rec)
                if len(buf) >= 4096:
                    f.write(b"".join(buf))
                    buf.clear()
            f.write(b"".join(buf))
        for _, p in group:
            p.unlink()
        self._runs[-count:] = [(level, merged)]

    def _read(self, path: Path) -> Iterator[bytes]:
        size = self.record
        chunk = max(size, _READ // size * size)
        with open(path, "rb") as f:
            while block := f.read(chunk):
                for i in range(0, len(block), size):
                    yield block[i:i + size]

    def __iter__(self) -> Iterator[bytes]:
        if not self._runs:
            yield from sorted(self._mem)
            return
        self._spill()
        if len(self._runs) > FAN_IN:
            n = len(self._runs) - FAN_IN + 1
            self._merge_last(n, self._runs[-n][0])  # levels stay non-increasing
        yield from _unique(heapq.merge(*(self._read(p) for _, p in self._runs)))

    def close(self) -> None:
        self._mem.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._runs = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unique(recs: Iterable[bytes]) -> Iterator[bytes]:
    last = None
    for rec in recs:
        if rec != last:
            yield rec
            last = rec
