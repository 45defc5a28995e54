"""``vault/blockchanges.py``: a cycle's block-map changes as a dict would keep them, in
40 bytes a block instead of a dict's ~140, and past a budget in run files: what is held
in memory does not grow with the blocks."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import pytest

from vault.blockchanges import BlockChanges
from vault.maps import ZERO_ID


def _id(n: int, v: int = 0) -> bytes:
    return n.to_bytes(8, "little") + v.to_bytes(8, "little") + bytes(16)


@pytest.mark.parametrize("limit", [1 << 20, 7, 333], ids=lambda n: f"limit{n}")
@pytest.mark.parametrize("seed", range(6))
def test_any_order_reads_back_as_a_dict_would_hold_it(seed: int, limit: int,
                                                      tmp_path: Path) -> None:
    rng = random.Random(seed)
    want: dict[int, bytes] = {}
    got = BlockChanges(limit=limit, spill_dir=tmp_path)
    n = 0
    for step in range(2000):
        if seed % 2 == 0 or rng.random() < 0.9:  # mostly in order; even seeds: always
            n += rng.randint(1, 3)
            block = n
        else:  # a block again, or one before the last
            block = rng.randint(0, n)
        bid = ZERO_ID if rng.random() < 0.1 else _id(block, step)
        want[block] = bid
        got.set(block, bid)
        if step % 500 == 0:  # reads in between do not change what is held
            assert dict(got.items()) == want
    assert len(got) == len(want)
    assert list(got.items()) == sorted(want.items())
    assert list(got.ids()) == [want[k] for k in sorted(want)]
    assert (got.runs > 0) == (limit < 2000)
    got.close()


def test_empty() -> None:
    c = BlockChanges()
    assert len(c) == 0 and list(c.items()) == [] and list(c.ids()) == []


def test_a_block_id_is_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        BlockChanges().set(0, b"short")


def test_a_block_costs_about_its_40_bytes() -> None:
    count = 200_000
    ids = [_id(n) for n in range(count)]  # the ids exist anyway (the hashes' output)
    tracemalloc.start()
    try:
        c = BlockChanges()
        for n, bid in enumerate(ids):
            c.set(n, bid)
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(c) == count
    # u64 + 32-byte id, plus the arrays' growth slack; a dict of the same held ~140.
    assert held / count < 50, held / count


def test_past_its_budget_what_is_held_stays_flat(tmp_path: Path) -> None:
    # Four times the budget's blocks hold no more memory than the budget's.
    limit = 20_000

    def held_for(count: int) -> tuple[float, BlockChanges]:
        tracemalloc.start()
        try:
            c = BlockChanges(limit=limit, spill_dir=tmp_path)
            for n in range(count):
                c.set(n, _id(n))
            n_items = sum(1 for _ in c.items())  # reading back holds no more either
            _held, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert n_items == count == len(c)
        return peak, c

    small, c1 = held_for(limit)
    large, c4 = held_for(4 * limit)
    assert c4.runs == 4 and c1.runs == 1
    assert large < 1.2 * small, (small, large)
    assert large / (4 * limit) < 15, large / (4 * limit)  # against 40 bytes a block in memory
    # The runs are unlinked files: nothing in the folder, before or after closing.
    assert os.listdir(tmp_path) == []
    assert list(c4.items())[limit + 5] == (limit + 5, _id(limit + 5))
    c1.close()
    c4.close()
    assert list(c4.items()) == []


def test_the_runs_are_gone_with_the_changes(tmp_path: Path) -> None:
    c = BlockChanges(limit=10, spill_dir=tmp_path)
    for n in range(100):
        c.set(n, _id(n))
    fds = set(os.listdir("/proc/self/fd"))
    c.close()
    assert len(fds - set(os.listdir("/proc/self/fd"))) == 10  # each run's file closed
