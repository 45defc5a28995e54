"""Orphan packs: packs this process server put that no index object lists.

A pack is put before the index object that lists it (vault/writer.py), so a kill -9,
or an upload that fails between the two, leaves packs in the vault that nothing
references and ``check`` warns about. The pack log (procserver/packlog.py) says which
of them are ours and for which cycle; ``settle`` decides each one's fate:

- listed by an index after all, or never put: nothing to do;
- of a cycle that will resume (still receiving or complete here), with a trailer that
  authenticates and blocks neither the index nor a pack adopted before it holds:
  *adopted*, i.e. one index
  object is written for all of them, so the resumed upload finds those blocks stored
  instead of sending them again (its segments are still in the cache: a pack is only
  ever written from segments whose checkpoint did not complete);
- anything else (the cycle is uploaded or aborted, a damaged trailer, blocks already
  stored elsewhere): *removed*.

Only packs in our own log are ever touched: never another process server's, whose
names are not in it. The caller holds the vault's shared lock (so no prune or
rebuild-index runs meanwhile) and makes sure no upload of the cycles settled is
running (at start, before the uploader; for one cycle, once its point is written).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from procserver import db
from procserver.packlog import PackLog
from vault import names
from vault.errors import IntegrityError, NotFoundError
from vault.index import BlockIndex
from vault.pack import PackEntry
from vault.rebuild import read_trailer
from vault.repo import Vault


@dataclass
class Settlement:
    """What ``settle`` did: the packs adopted (indexed) and removed."""

    adopted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # removed: the trailer failed


async def resumable_cycles(sessionmaker: async_sessionmaker[AsyncSession]) -> set[int]:
    """The cycles the uploader will go on with: still receiving, or complete."""
    async with sessionmaker() as s:
        return set((await s.execute(select(db.Cycle.seq).where(
            db.Cycle.state.in_([db.RECEIVING, db.COMPLETE])))).scalars().all())


async def settle(vault: Vault, index: BlockIndex, pack_log: PackLog, resumable: set[int],
                 only: set[int] | None = None) -> Settlement:
    """Settle the packs in ``pack_log`` (of the cycles ``only``, if given) against
    ``index`` (up to date: every index object of the vault), as the module says, and
    forget them in the log. A store error stops it; what is not settled yet stays in
    the log for the next time (each step can be done again)."""
    logged = await asyncio.to_thread(pack_log.read)
    todo = {p: seq for p, seq in logged.items() if only is None or seq in only}
    out = Settlement()
    if not todo:
        return out
    indexed = index.packs  # listed by an index object (where its blocks are found or not)
    adopt: dict[str, list[PackEntry]] = {}
    done: set[str] = set()
    claimed: set[bytes] = set()  # blocks of the packs adopted so far: one copy is enough
    for pack_id, seq in sorted(todo.items()):
        if pack_id in indexed:
            done.add(pack_id)
            continue
        name = names.pack_name(pack_id)
        try:
            size = (await vault.store.stat(name)).size
        except NotFoundError:  # killed before (or while) it was put
            done.add(pack_id)
            continue
        if seq in resumable:
            try:
                entries, _end = await read_trailer(vault, pack_id, size)
            except IntegrityError:
                out.damaged.append(pack_id)
                entries = []
            new = {e.block_id for e in entries} - claimed
            if any(b not in index.entries for b in new):
                adopt[pack_id] = entries
                claimed |= new
                continue
        await vault.store.delete(name)
        out.removed.append(pack_id)
        done.add(pack_id)
    if adopt:
        # One index object for them all, written after the packs it lists exist.
        await vault.put_index(adopt, index)
        out.adopted = sorted(adopt)
        done.update(adopt)
    await asyncio.to_thread(pack_log.forget, done)
    return out
