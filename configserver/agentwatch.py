"""What a running agent must act on at once, watched for it (a long poll).

An agent pulls its settings every heartbeat interval (60 s). Some changes should not wait
that long: replication enabled, disabled or to be resynchronized, a failover's request
to shut the machine down after a last cycle (the source's downtime of a planned
failover), a failback's request to write a point. The settings carry ``digest``, a hash
of exactly those; between two pulls the agent's daemon waits on ``GET
/api/v1/agent/settings/changes?since=DIGEST&wait=S``, answered as soon as its machine's
digest is not ``since`` (read from the catalog when the call comes, and again when woken),
or after ``wait`` seconds — then it pulls its settings.

One ``AgentWatch`` a server wakes the waiting calls: a pass reads every item's digest with
one query after each change of the catalog (``core.notifier``; at most one pass a second,
and one a minute anyway; none while no agent waits) and sets an event per machine whose
digest moved, so agents
waiting cost one query per change, not one each. Changes another configuration server
makes on a shared PostgreSQL catalog arrive through its notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json

import structlog
from sqlalchemy import select

from configserver import db
from configserver.core import Core, next_pass
from configserver.items import ItemState

log = structlog.get_logger("configserver.agentwatch")

MAX_WAIT_SECONDS = 55.0  # under the agent's own request timeout and common proxies' 60 s
_GAP_SECONDS, _PASS_SECONDS = 1.0, 60.0


FAILBACK = "failback"  # the failback's record, inside the item's failover record


def failback_request(item: db.ReplicatedItem | None) -> dict[str, str] | None:
    """What a running failback asks of the machine's agent (its settings), if anything."""
    if item is None or item.state != ItemState.FAILBACK_IN_PROGRESS:
        return None
    fb = (item.failover or {}).get(FAILBACK) or {}
    if fb.get("request") and fb.get("point") and not fb.get("reported"):
        return {"request": str(fb["request"]), "point": str(fb["point"])}
    return None


def shutdown_request(item: db.ReplicatedItem | None) -> str | None:
    """The id of a failover's unanswered request to shut the machine down, if any."""
    if item is None or item.state != ItemState.FAILOVER_IN_PROGRESS:
        return None
    asked = (item.failover or {}).get("shutdown") or {}
    return str(asked["request"]) if asked.get("request") and not asked.get("reported") \
        else None


def digest(item: db.ReplicatedItem | None) -> str:
    """What of ``item`` its agent acts on at once, hashed: its state and the failover's
    and failback's requests."""
    what = None if item is None else [item.state, shutdown_request(item),
                                      failback_request(item)]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


async def digest_of(core: Core, machine: str) -> str:
    async with core.sessionmaker() as s:
        return digest(await s.get(db.ReplicatedItem, machine))


class AgentWatch:
    def __init__(self) -> None:
        self._digests: dict[str, str] = {}
        self._woken: dict[str, asyncio.Event] = {}  # machines with a call waiting
        self._closed = False
        self.waiting = 0  # calls waiting now (the gauge siterecovery_..._agent_long_polls)
        self.changed = asyncio.Condition()  # notified when that number changes

    def close(self) -> None:
        """Answer every waiting call now, and later ones at once: the server is stopping,
        and its requests in progress hold its stop for as long as they last."""
        self._closed = True
        for woken in self._woken.values():
            woken.set()
        self._woken.clear()

    async def wait(self, core: Core, machine: str, since: str, timeout: float) -> str:
        """``machine``'s digest once it is not ``since``, or after ``timeout`` seconds."""
        woken = self._woken.setdefault(machine, asyncio.Event())
        now = await digest_of(core, machine)
        if now == since and not self._closed:
            await self._count(core, +1)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(timeout, MAX_WAIT_SECONDS)):
                        await woken.wait()
            finally:
                await self._count(core, -1)
            now = await digest_of(core, machine)
        return now

    async def _count(self, core: Core, step: int) -> None:
        self.waiting += step
        core.metrics.agent_long_polls.set(self.waiting)
        async with self.changed:
            self.changed.notify_all()

    async def pass_once(self, core: Core) -> None:
        async with core.sessionmaker() as s:
            items = (await s.execute(select(db.ReplicatedItem))).scalars().all()
        digests = {i.machine: digest(i) for i in items}
        for machine in set(digests) | set(self._digests):
            if digests.get(machine) != self._digests.get(machine):
                woken = self._woken.pop(machine, None)
                if woken is not None:
                    woken.set()
        self._digests = digests

    async def run(self, core: Core) -> None:
        """The background pass (``pass_once``) after every change of the catalog."""
        async with core.notifier.watching("agent-watch") as dirty:
            while True:
                dirty.clear()
                try:
                    if self._woken:  # no agent waits: nothing to read (the first pass
                        await self.pass_once(core)  # after a lull may wake some for naught)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a catalog hiccup: waiting agents time out, no more
                    log.error("agent_watch_failed", error=str(e),
                              error_type=type(e).__name__, retry_in_seconds=_PASS_SECONDS)
                await next_pass(dirty, _GAP_SECONDS, _PASS_SECONDS)
