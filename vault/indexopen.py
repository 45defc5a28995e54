"""Which block index a process opens: in memory when it fits, on local disk when not.

``open_block_index`` estimates the vault's block count from the sizes of its index
objects (an entry is 44 bytes of plaintext; the sealing adds a few dozen bytes per
object) and the in-memory ``Index``'s cost (``MEMORY_PER_BLOCK``, measured): within
``memory`` bytes it loads an ``Index`` (faster to build than a table is to fill, and
no file), past it a ``DiskIndex`` (vault/indexdb.py) in ``index_dir``, brought up to
date with ``Vault.refresh_index``.
"""

from __future__ import annotations

import asyncio
import os

from vault import names
from vault.index import BlockIndex, Index
from vault.indexdb import DEFAULT_CACHE, DiskIndex
from vault.pack import ENTRY
from vault.repo import Vault

MEMORY_PER_BLOCK = 220  # bytes a block takes in ``Index`` (a dict entry and a Location)


async def estimate_blocks(vault: Vault) -> int:
    """About how many blocks the vault's index objects list (from their sizes alone)."""
    return sum([info.size async for info in vault.store.list(names.INDEX)]) // ENTRY.size


async def open_block_index(vault: Vault, *, index_dir: str | os.PathLike[str] | None,
                           memory: int | None = None) -> BlockIndex:
    """The vault's block index, loaded and up to date: an in-memory ``Index`` without
    ``index_dir``, or when the estimate fits in ``memory`` bytes; else the ``DiskIndex``
    of this vault in ``index_dir``, refreshed (rebuilt where it is stale). The caller
    closes it (``BlockIndex.close``)."""
    if index_dir is None:
        return await vault.load_index()
    blocks = await estimate_blocks(vault)
    if memory is not None and blocks * MEMORY_PER_BLOCK <= memory:
        return await vault.load_index()
    return await open_disk_index(vault, index_dir, memory, blocks)


def outgrown(index: BlockIndex, memory: int | None) -> bool:
    """Whether ``index``, an in-memory ``Index`` that ``open_block_index`` chose while the
    vault was smaller (or empty), now holds more than ``memory`` bytes' worth of blocks:
    a long-running process moves it to disk (``open_disk_index``)."""
    return (isinstance(index, Index) and memory is not None
            and len(index) * MEMORY_PER_BLOCK > memory)


async def open_disk_index(vault: Vault, index_dir: str | os.PathLike[str],
                          memory: int | None, blocks: int) -> DiskIndex:
    """The ``DiskIndex`` of this vault in ``index_dir`` (about ``blocks`` blocks, a cache
    within ``memory``), refreshed (rebuilt where it is stale). The caller closes it."""
    cache = DEFAULT_CACHE if memory is None else max(1 << 20, min(DEFAULT_CACHE, memory // 4))
    # Off the event loop: opening may finish a build a kill interrupted or scan the ids.
    index = await asyncio.to_thread(DiskIndex.open, index_dir, vault.config.vault_id,
                                    expect=blocks, cache_bytes=cache)
    try:
        return await vault.refresh_index(index)
    except BaseException:
        index.close()
        raise
