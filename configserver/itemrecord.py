"""A replicated item's recovery records, read and merged by the failover steps.

An item keeps two: ``last_drill`` (the newest Test failover and its cleanup) and
``failover`` (the failover, its changes of point and its commit). Each is a JSON
document merged one commit at a time, so that a step re-run after a restart reads back
what it learned before.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.items import ItemState
from configserver.jobdefs import StepFailed
from configserver.jobs import StepContext
from configserver.recovery import RecoverySettings

DRILL, FAILOVER = "last_drill", "failover"  # the item's record each kind writes


async def _item(s: AsyncSession, machine: str, lock: bool = False) -> db.ReplicatedItem:
    item = await s.get(db.ReplicatedItem, machine, with_for_update=lock)
    if item is None:
        raise StepFailed(f"machine {machine!r} has no replicated item any more")
    return item


async def read(ctx: StepContext, field: str) -> tuple[dict[str, Any], RecoverySettings]:
    async with ctx.core.sessionmaker() as s:
        item = await _item(s, ctx.target)
        return dict(getattr(item, field) or {}), RecoverySettings.stored(item.recovery)


async def record(ctx: StepContext, field: str, *, state: ItemState | None = None,
                 **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the item's ``field`` (and set its state) in one commit."""
    async with ctx.core.sessionmaker() as s:
        # Locked: agents' check-ins and point reports merge into the same record.
        item = await _item(s, ctx.target, lock=True)
        doc = {**(getattr(item, field) or {}), **values}
        setattr(item, field, doc)
        if state is not None:
            item.state = state
        item.updated = ctx.core.clock()
        await s.commit()
    await ctx.core.notify()
    return doc
