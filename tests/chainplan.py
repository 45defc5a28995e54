"""The cycles of a sparse disk's delta chain, for the memory tests of FETCH and restore
(tests/test_fetch_memory.py, tests/test_restore_memory.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from common.labels import CRASH
from vault.point import Point
from vault.repo import Vault
from vault.writer import CycleWriter, DiskSpec


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


async def write_cycle(vault: Vault, ex: ThreadPoolExecutor, cycle: int,
                      changes: dict[int, bool], content: Callable[[int, int], bytes],
                      nblocks: int, block: int, base: Point | None, digest: str) -> Point:
    """Cycle ``cycle`` of big01's disk sda (``nblocks`` blocks of ``block`` bytes) through
    the vault's own writer, a batch of blocks at a time: each block of ``changes``
    written as ``content(n, cycle)`` (True) or zeroed (False), a delta of ``base`` (full
    without one); its point, with ``digest`` as the disk's digest."""
    w = CycleWriter(vault, await vault.load_index(), ex, machine="big01",
                    cycle=f"c{cycle}", disks=[DiskSpec("sda", nblocks * block, block)],
                    full=base is None, base=base)
    order = sorted(changes)
    for i in range(0, len(order), 4096):
        await w.add([(0, n, content(n, cycle) if changes[n] else None)
                     for n in order[i:i + 4096]])
    return await w.finish({"sda": digest}, CRASH)
