"""The cycles of a sparse disk's delta chain, for the memory tests of FETCH and restore
(tests/test_fetch_memory.py, tests/test_restore_memory.py)."""

from __future__ import annotations

import random


def chain_plan(rng: random.Random, nblocks: int, full_blocks: int, delta_blocks: int
               ) -> list[dict[int, bool]]:
    """The blocks each cycle writes (True) or zeroes (False): a full map of
    ``full_blocks`` of ``nblocks``, then two deltas of ``delta_blocks`` each that change
    and zero blocks of the point before and add new ones."""
    cycles: list[dict[int, bool]] = [dict.fromkeys(rng.sample(range(nblocks), full_blocks),
                                                   True)]
    disk = set(cycles[0])
    for _ in (1, 2):
        old = rng.sample(sorted(disk), delta_blocks // 2)
        delta = {n: i % 3 != 0 for i, n in enumerate(old)}  # a third of them zeroed
        delta.update(dict.fromkeys(rng.sample(range(nblocks), delta_blocks // 2), True))
        cycles.append(delta)
        disk.difference_update(n for n, data in delta.items() if not data)
        disk.update(n for n, data in delta.items() if data)
    return cycles
