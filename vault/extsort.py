"""``SortedSet``: a set of fixed-size byte strings within a memory budget.

Records are gathered in memory; past the budget the gathered ones are sorted and written
to a run file in a temporary directory of their own, and iterating merges the runs
(``heapq.merge``, at most ``FAN_IN`` files open at once: more runs are merged in passes
first). Iteration yields every record once, in byte order, and may be repeated. The
directory (``siterecovery-sort-*`` in ``temp_dir``, or the system's temporary
directory) is removed by ``close``; one that a kill left behind is garbage that no
later run reads.
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
        self._runs: list[Path] = []
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
        self._runs.append(path)
        self.spilled += 1
        if len(self._runs) > FAN_IN:  # keep the fan-in of the final merge bounded
            self._merge_runs()

    def _merge_runs(self) -> None:
        assert self._dir is not None
        merged = self._dir / f"run-{self.spilled:06d}-merged"
        with open(merged, "wb") as f:
            buf: list[bytes] = []
            for rec in _unique(heapq.merge(*(self._read(p) for p in self._runs))):
                buf.append(rec)
                if len(buf) >= 4096:
                    f.write(b"".join(buf))
                    buf.clear()
            f.write(b"".join(buf))
        for p in self._runs:
            p.unlink()
        self._runs = [merged]

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
        yield from _unique(heapq.merge(*(self._read(p) for p in self._runs)))

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
