"""The durable side of the consistency groups' barriers (``procserver/barrier.py``): which
barriers are open here, and the outbox of their outcomes on their way to the
configuration server (``POST /api/v1/internal/group-points``).

- A barrier is recorded **open** (``open_group_points``) at its first arrival, before
  that member waits.
- Its **outcome** goes into the outbox (``group_point_reports``) in the same transaction
  that closes it, and before any member is released: a member told "released" has its
  group point on disk here, so a ``kill -9`` between the release and the report loses
  nothing — the restarted process server sends it.
- At a start (``recover``), a barrier still open was open when the process server
  stopped: its members lost their connection to it and went on with ordinary cycles.
  It becomes a ``failed`` outcome naming the restart, so the catalog raises
  ``group_point_failed`` for it instead of never hearing of it.

``run`` sends the outbox oldest first, each report retried with back-off while the
configuration server is away or answers 5xx; a report it refuses (4xx: it can never be
accepted) is logged and dropped. A report leaves the outbox only once answered.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.backoff import Backoff
from procserver.models import GroupPointReport, OpenGroupPoint

log = structlog.get_logger("procserver.groupoutbox")
RESTARTED = ("the process server holding the barrier restarted while the group point was "
             "open")


class GroupPointOutbox:
    """Open barriers and unsent outcomes in the process server's database; ``post``
    sends one outcome and returns the HTTP status (``enabled`` False: no configuration
    server, nothing is queued)."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession],
                 post: Callable[[dict[str, Any]], Awaitable[int]], *, enabled: bool = True,
                 wall: Callable[[], float] = time.time) -> None:
        self.sessionmaker, self.post, self.enabled, self.wall = \
            sessionmaker, post, enabled, wall
        self.wake = asyncio.Event()
        self.sent = 0  # reports the configuration server answered, since the start

    async def opened(self, point: str, group: str, members: list[str]) -> None:
        """The barrier of ``point`` opened (its first arrival)."""
        async with self.sessionmaker() as s:
            if await s.get(OpenGroupPoint, point) is None:
                s.add(OpenGroupPoint(point_id=point, group_name=group,
                                     members=json.dumps(sorted(members)), opened=self.wall()))
                await s.commit()

    async def finished(self, doc: dict[str, Any]) -> None:
        """The barrier of ``doc['id']`` ended with the outcome ``doc``: no longer open,
        its report in the outbox (one transaction)."""
        async with self.sessionmaker() as s:
            await s.execute(delete(OpenGroupPoint).where(OpenGroupPoint.point_id == doc["id"]))
            if self.enabled:
                s.add(GroupPointReport(point_id=doc["id"], doc=json.dumps(doc)))
            await s.commit()
        self.wake.set()

    async def recover(self) -> list[dict[str, Any]]:
        """At a start: every barrier left open becomes a failed outcome in the outbox;
        those outcomes."""
        failed: list[dict[str, Any]] = []
        async with self.sessionmaker() as s:
            rows = (await s.execute(select(OpenGroupPoint).order_by(OpenGroupPoint.opened))
                    ).scalars().all()
            for row in rows:
                members = json.loads(row.members)
                doc = {"id": row.point_id, "group": row.group_name, "created": row.opened,
                       "state": "failed", "members": {m: None for m in members},
                       "error": RESTARTED}
                failed.append(doc)
                if self.enabled:
                    s.add(GroupPointReport(point_id=row.point_id, doc=json.dumps(doc)))
                await s.delete(row)
                log.warning("group_point_failed", group=row.group_name,
                            group_point=row.point_id, error=RESTARTED,
                            hint="its members went on with their own cycles; the next "
                                 "group point is taken at the group's next interval")
            await s.commit()
        return failed

    async def unsent(self) -> int:
        async with self.sessionmaker() as s:
            return int(await s.scalar(select(func.count()).select_from(GroupPointReport))
                       or 0)

    async def _next(self) -> tuple[int, dict[str, Any]] | None:
        async with self.sessionmaker() as s:
            row = (await s.execute(select(GroupPointReport).order_by(GroupPointReport.seq)
                                   .limit(1))).scalars().first()
            return None if row is None else (row.seq, json.loads(row.doc))

    async def _done(self, seq: int) -> None:
        async with self.sessionmaker() as s:
            await s.execute(delete(GroupPointReport).where(GroupPointReport.seq == seq))
            await s.commit()

    async def run(self) -> None:
        """Send the outbox, oldest first, for as long as the process server runs."""
        while True:
            self.wake.clear()
            got = await self._next()
            if got is None:
                await self.wake.wait()
                continue
            seq, doc = got
            backoff = Backoff(1.0, 60.0)
            while True:
                try:
                    status = await self.post(doc)
                except Exception as e:  # the configuration server is away: retried
                    status, error = 0, str(e) or type(e).__name__
                else:
                    error = f"HTTP {status}"
                if 0 < status < 500:
                    break
                log.warning("group_point_report_failed", group_point=doc["id"], error=error)
                await asyncio.sleep(backoff.next())
            if status >= 400:
                log.error("group_point_report_refused", group_point=doc["id"], status=status,
                          hint="the configuration server can never accept it: dropped")
            else:
                log.info("group_point_reported", group_point=doc["id"], state=doc["state"])
            await self._done(seq)
            self.sent += 1
