"""procserver/journal.py: a cycle's journal appended and read back a batch at a time; a
torn tail (an append cut by a crash, never fsynced) is cut off."""

from __future__ import annotations

from pathlib import Path

import pytest

from procserver.journal import JREC, append_journal, cut_journal, read_journal, replay_journal


def _entries(lo: int, hi: int) -> list[tuple[int, int, bytes]]:
    return [(n % 3, n, n.to_bytes(32, "little")) for n in range(lo, hi)]


def test_batches_read_back_what_was_appended_and_a_torn_tail_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "c1" / "changes.log"
    assert cut_journal(path) == 0  # none yet
    append_journal(path, _entries(0, 1000))
    append_journal(path, _entries(1000, 2500))
    with open(path, "ab") as f:  # a crash in the middle of an append
        f.write(JREC.pack(0, 2500, bytes(32))[:17])
    assert cut_journal(path) == 2500
    assert path.stat().st_size == 2500 * JREC.size
    got = [e for lo in range(0, 2500, 700)
           for e in read_journal(path, lo, min(700, 2500 - lo))]
    assert got == _entries(0, 2500)
    append_journal(path, _entries(2500, 2600))  # appends stay aligned after the cut
    assert read_journal(path, 2550, 50) == _entries(2550, 2600)
    with pytest.raises(OSError, match="ends before entry 2601"):
        read_journal(path, 2600, 1)


async def test_a_journal_is_replayed_a_batch_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "changes.log"
    assert await replay_journal(path, _fail) == 0  # none: nothing to apply
    append_journal(path, _entries(0, 2500))
    batches: list[list[tuple[int, int, bytes]]] = []

    async def apply(batch: list[tuple[int, int, bytes]]) -> None:
        batches.append(batch)

    assert await replay_journal(path, apply, batch=700) == 2500
    assert [len(b) for b in batches] == [700, 700, 700, 400]
    assert [e for b in batches for e in b] == _entries(0, 2500)


async def _fail(batch: list[tuple[int, int, bytes]]) -> None:
    raise AssertionError("an empty journal has no batch")
