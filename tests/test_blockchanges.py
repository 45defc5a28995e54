"""``vault/blockchanges.py``: a cycle's block-map changes as a dict would keep them, in
40 bytes a block instead of a dict's ~140."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from vault.blockchanges import BlockChanges
from vault.maps import ZERO_ID


def _id(n: int, v: int = 0) -> bytes:
    return n.to_bytes(8, "little") + v.to_bytes(8, "little") + bytes(16)


@pytest.mark.parametrize("seed", range(6))
def test_any_order_reads_back_as_a_dict_would_hold_it(seed: int) -> None:
    rng = random.Random(seed)
    want: dict[int, bytes] = {}
    got = BlockChanges()
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
