"""A FETCH without a whole disk's map as a dict (#16): the process server keeps the
point's delta chain as its maps' plaintexts (vault/mapchain.py, 40 bytes an entry) and
finds the blocks asked for by binary search in each map, newest first.

A point of a sparse 1 TiB disk at the end of a delta chain (blocks changed, zeroed and
added by the deltas), written by the vault's own writer: FETCHes of scattered blocks get
every block byte-exact and in the order asked (data of the full map, of a delta, blocks
zeroed by a delta, blocks never written); what the FETCH path allocates (tracemalloc's
peak, the process server in this process included, a count of bytes) stays within
100 bytes a map entry besides a FETCH's own buffers, where the resolved dict of the
same map takes more than 150. A chain with a damaged map (authentic, but out of order or
past the disk) is refused with ``bad_fetch`` before any block is sent."""

from __future__ import annotations

import dataclasses
import random
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.labels import CRASH
from mobility.link import Link
from tests.chainplan import chain_plan, write_cycle
from tests.helpers import (
    BLOCK,
    Pki,
    agent_config,
    make_agent,
    open_vault,
    proc_config,
    running_procserver,
)
from vault import names
from vault.crypto import ObjectType, seal
from vault.mapchain import MapChain, chain_entries
from vault.maps import DELTA, ENTRY, HEAD
from vault.point import Point, seal_point
from vault.repo import Vault
from vault.writer import CycleWriter, DiskSpec
from wire.protocol import FrameType, encode_json

NBLOCKS = 1 << 24  # 1 TiB of 64 KiB blocks
FULL_BLOCKS = 120_000  # mapped by the full map
DELTA_BLOCKS = 12_000  # changed, zeroed or added by each of the two deltas
PER_FETCH = 64  # blocks a FETCH: a FETCH's own buffers stay small beside the map


def _content(n: int, cycle: int, distinct: set[int]) -> bytes:
    """Block ``n`` as ``cycle`` writes it: its own bytes if it is one the test asks for,
    else one block shared by all of that cycle (stored once: the vault stays small)."""
    tag = n if n in distinct else NBLOCKS + cycle
    return tag.to_bytes(8, "little") + cycle.to_bytes(8, "little") + bytes(BLOCK - 16)


async def _write(vault: Vault, cycles: list[dict[int, bool]], distinct: set[int]) -> Point:
    """The cycles through the vault's own writer, a batch of blocks at a time."""
    base: Point | None = None
    with ThreadPoolExecutor(2) as ex:
        for c, changes in enumerate(cycles):
            base = await write_cycle(vault, ex, c, changes,
                                     lambda n, cycle: _content(n, cycle, distinct),
                                     NBLOCKS, BLOCK, base, "")
    assert base is not None
    return base


async def _fetch(link: Link, point: str, blocks: list[int],
                 expect: Callable[[int], bytes]) -> None:
    """One FETCH, each answer compared as it comes (nothing of it is kept)."""
    link.send(encode_json(FrameType.FETCH, {"point": point, "disk": "sda", "blocks": blocks}))
    for want in blocks:
        f = await link.recv(60)
        if f.type == FrameType.ZERO:
            _d, n, data = f.block()
            assert (n, bytes(data)) == (want, b""), (want, n)
            assert expect(n) == bytes(BLOCK), n
        else:
            assert f.type == FrameType.BLOCK, f.type
            _d, n, data = f.block()
            assert n == want and data == expect(n), (want, n)
    end = await link.recv(60)
    assert end.type == FrameType.FETCH and end.json()["blocks"] == len(blocks)


async def test_fetch_answers_exactly_from_the_chain_without_a_dict_of_the_disk(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    rng = random.Random(16)
    cycles = chain_plan(rng, NBLOCKS, FULL_BLOCKS, DELTA_BLOCKS)
    last: dict[int, int] = {}  # block -> the cycle that wrote it last (absent: zero)
    zeroed: set[int] = set()
    for c, changes in enumerate(cycles):
        for n, data in changes.items():
            if data:
                last[n] = c
                zeroed.discard(n)
            else:
                last.pop(n, None)
                zeroed.add(n)
    # Scattered over the disk: blocks of the full map, of each delta, zeroed by a delta,
    # never written (most of the disk), and the first and last.
    of_cycle = [sorted(n for n, c in last.items() if c == cycle) for cycle in (0, 1, 2)]
    asked = [n for ns in of_cycle for n in rng.sample(ns, 2 * PER_FETCH)]
    asked += [*rng.sample(sorted(zeroed), PER_FETCH), 0, NBLOCKS - 1]
    asked += [n for n in rng.sample(range(NBLOCKS), 2 * PER_FETCH) if n not in last]
    rng.shuffle(asked)
    distinct = set(asked)

    def expect(n: int) -> bytes:
        return _content(n, last[n], distinct) if n in last else bytes(BLOCK)

    vault = await open_vault(tmp_path / "vault", key)
    try:
        point = await _write(vault, cycles, distinct)
        entries = MapChain(await chain_entries(vault, point, "sda")).entries
        tracemalloc.start()
        try:
            resolved = await vault.resolve_map(point, "sda")  # what a FETCH used to hold
            as_dict = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert resolved.blocks.keys() == last.keys()  # the test's own account is right
        # The chain's answers are the resolved dict's, for every block asked.
        assert await MapChain(await chain_entries(vault, point, "sda")).lookup(asked) == {
            n: resolved.blocks[n] for n in asked if n in resolved.blocks}
        del resolved
    finally:
        await vault.close()
    assert entries > FULL_BLOCKS + DELTA_BLOCKS and as_dict > 150 * entries, (as_dict, entries)
    async with running_procserver(proc_config(tmp_path, pki, url, key)) as ps:
        agent = make_agent(agent_config(tmp_path, pki, "big01", ps.port,
                                        {"sda": tmp_path / "sda.img"}))
        link = await agent._connect_retrying()
        try:
            tracemalloc.start()
            try:
                for i in range(0, len(asked), PER_FETCH):
                    await _fetch(link, point.id, asked[i:i + PER_FETCH], expect)
                held, with_chain = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                # The chain is held by the session now: the same FETCHes again cost
                # what a FETCH itself holds (frames, buffers, a block read).
                for i in range(0, len(asked), PER_FETCH):
                    await _fetch(link, point.id, asked[i:i + PER_FETCH], expect)
                own = tracemalloc.get_traced_memory()[1] - held
            finally:
                tracemalloc.stop()
        finally:
            await link.close()
            agent.close()
    print(f"peak bytes: resolved dict {as_dict}, FETCHes reading the chain {with_chain}, "
          f"FETCHes alone {own}, held after {held}; {entries} map entries")
    # The chain's maps, 40 bytes an entry, and a sealed map beside its plaintext while
    # it is opened: within 100 bytes an entry of what a FETCH holds anyway; what the
    # session keeps for the next FETCH is the maps' 40 bytes an entry.
    assert with_chain - own < 100 * entries, (with_chain, own, entries)
    assert held < 40 * entries + (1 << 20), (held, entries)


def _sealed_map(vault: Vault, map_id: str, kind: int, size: int,
                items: list[tuple[int, bytes]]) -> bytes:
    """A map sealed with the vault's key whose entries are as given, in that order."""
    plain = HEAD.pack(kind, size, BLOCK, len(items)) + b"".join(
        ENTRY.pack(n, bid) for n, bid in items)
    return seal(vault.keyring.aead(ObjectType.MAP, map_id), ObjectType.MAP, map_id, plain)


async def test_a_damaged_chain_is_refused_and_nothing_of_it_sent(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """A delta's map whose entries are out of order, or name a block past the disk, a
    base point without the disk (authentic, as a writer's bug would leave them): the
    FETCH is answered with ERROR bad_fetch alone; the session goes on, and the repaired
    chain is read again."""
    url, key = vault_at
    size = 16 * BLOCK
    cycles = [dict.fromkeys(range(8), True), {2: True, 3: False, 12: True}, {5: True}]
    last = {n: 0 for n in range(8) if n != 3} | {2: 1, 12: 1, 5: 2}
    vault = await open_vault(tmp_path / "vault", key)
    try:
        base: Point | None = None
        with ThreadPoolExecutor(2) as ex:
            for c, changes in enumerate(cycles):
                w = CycleWriter(vault, await vault.load_index(), ex, machine="small01",
                                cycle=f"c{c}", disks=[DiskSpec("sda", size, BLOCK)],
                                full=base is None, base=base)
                await w.add([(0, n, _content(n, c, set(range(16))) if data else None)
                             for n, data in sorted(changes.items())])
                base = await w.finish({"sda": ""}, CRASH)
        assert base is not None and base.base is not None
        mid_point = await vault.read_point(base.base)
        middle = mid_point.disk("sda").map
        good = {name: await vault.store.get(name)
                for name in (names.MAPS + middle, names.POINTS + mid_point.id)}
        ids = sorted((await vault.read_map(middle)).blocks.items())
        no_sda = seal_point(vault.keyring, dataclasses.replace(mid_point, disks=[
            dataclasses.replace(mid_point.disk("sda"), disk="sdb")]))
    finally:
        await vault.close()

    def expect(n: int) -> bytes:
        return _content(n, last[n], set(range(16))) if n in last else bytes(BLOCK)

    asked = [12, 3, 5, 2, 0, 15, 7]
    async with running_procserver(proc_config(tmp_path, pki, url, key)) as ps:
        vault = ps.vaults.vault
        agent = make_agent(agent_config(tmp_path, pki, "small01", ps.port,
                                        {"sda": tmp_path / "sda.img"}))
        link = await agent._connect_retrying()
        try:
            for name, damaged in (
                    (names.MAPS + middle, _sealed_map(vault, middle, DELTA, size,
                                                      ids[::-1])),  # out of order
                    (names.MAPS + middle, _sealed_map(vault, middle, DELTA, size,
                                                      [*ids, (16, ids[0][1])])),  # past
                    (names.POINTS + mid_point.id, no_sda)):  # a base without the disk
                await vault.store.put(name, damaged)
                link.send(encode_json(FrameType.FETCH, {"point": base.id, "disk": "sda",
                                                        "blocks": asked}))
                err = await link.recv(60)  # the first frame: no block went before it
                assert err.type == FrameType.ERROR, err.type
                assert err.json()["code"] == "bad_fetch", err.json()
                assert "verify the vault" in err.json()["hint"]
            for name, data in good.items():
                await vault.store.put(name, data)
            await _fetch(link, base.id, asked, expect)
        finally:
            await link.close()
            agent.close()
