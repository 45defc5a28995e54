"""The notification outbox: alert raise/clear notices waiting for their channels.

``enqueue`` runs inside the alert evaluation's own transaction (configserver/alerts.py),
so a notice exists exactly when its event row does: a crash before the commit loses
both, one after it loses neither, and the delivery worker (configserver/notifydeliver.py)
finds the notice after a restart. Each notice goes to every channel whose severities
include the alert's severity, as one row per channel (a failing mailbox does not hold
back the webhook).

A notice is a JSON object::

    {"event": "alert_raised" | "alert_cleared" | "test", "code": ..., "target": ...,
     "severity": "warning" | "critical", "message": ..., "time": ISO 8601 UTC}

Rows are ``pending`` until delivered (``delivered``) or until their retries are used up
(``failed``, with ``last_error``); delivered and failed rows older than ``KEEP_SECONDS``
are removed by the worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver.models import NotifyChannel, NotifyOutbox
from configserver.schema import iso

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
RAISED, CLEARED, TEST = "alert_raised", "alert_cleared", "test"
KEEP_SECONDS = 7 * 86400  # finished rows are kept this long for 'notify list'


@dataclass(frozen=True)
class Change:
    """An alert that was raised or cleared (``event`` is RAISED or CLEARED)."""

    event: str
    code: str
    target: str
    severity: str
    message: str


def notice(change: Change, now: float) -> dict[str, Any]:
    return {"event": change.event, "code": change.code, "target": change.target,
            "severity": change.severity, "message": change.message, "time": iso(now)}


async def enqueue(s: AsyncSession, now: float, changes: Iterable[Change]) -> int:
    """Add one pending row per (change, channel that takes its severity) to the session's
    transaction; the caller commits. Returns how many rows were added."""
    changes = list(changes)
    if not changes:
        return 0
    channels = (await s.execute(select(NotifyChannel.name, NotifyChannel.severities))).all()
    added = 0
    for change in changes:
        for name, severities in channels:
            if change.severity in severities:
                s.add(NotifyOutbox(channel=name, notice=notice(change, now), created=now,
                                   state=PENDING, attempts=0, next_attempt=now,
                                   delivered=None, last_error=None))
                added += 1
    return added
