"""Delivering the notification outbox (configserver/notifyoutbox.py), at least once.

The worker takes due ``pending`` rows oldest first, claims each by moving its
``next_attempt`` a lease ahead (a compare-and-set, so configuration servers sharing one
PostgreSQL catalog never send the same row at the same time), sends it and marks it
``delivered``. A failed send is retried with ``common.backoff.Backoff`` (``BACKOFF``,
about 4 hours in all) and then marked ``failed`` with the last error; a server that
stops mid-send leaves the row pending, and it is sent again when the lease runs out.
Receivers deduplicate on ``X-Siterecovery-Delivery`` (the row id).

The worker wakes when the catalog changes (``core.notify()``: the alert evaluation calls
it after a commit that raised or cleared something) and when the next retry is due.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import delete, func, select, update

from common.backoff import Backoff
from configserver import sealed
from configserver.core import Core, next_pass
from configserver.models import NotifyChannel, NotifyOutbox
from configserver.notifyoutbox import DELIVERED, FAILED, KEEP_SECONDS, PENDING
from configserver.notifysend import TIMEOUT_SECONDS, SendError, send_email, send_webhook

log = structlog.get_logger("configserver.notify")

BACKOFF = Backoff(base=10.0, cap=1800.0)
MAX_ATTEMPTS = 16
LEASE_SECONDS = 4 * TIMEOUT_SECONDS  # a claimed row is sent again after this if unfinished
IDLE_SECONDS = 60.0  # with nothing due, look again at least this often
_MIN_GAP_S = 0.2  # a burst of catalog changes costs one pass per gap
BATCH = 100
SECRET_KINDS = {"webhook": "webhook-secret", "email": "smtp-password"}


def seal_name(channel: str) -> str:
    """The name a channel's secret is sealed under: never an account's (a NAME has no '/')."""
    return f"notify/{channel}"


def open_secret(key_path: Path, ch: NotifyChannel) -> bytes | None:
    """The channel's secret, opened with the key file; ``SendError`` if it cannot be."""
    if ch.secret is None:
        return None
    try:
        return sealed.unseal(sealed.read_key(key_path), seal_name(ch.name),
                             SECRET_KINDS[ch.kind], ch.secret, where=str(key_path))
    except sealed.SecretError as e:
        raise SendError(f"the secret of channel {ch.name!r} cannot be opened ({e.code}); "
                        f"restore {key_path} or add the channel again") from None


async def send(ch: NotifyChannel, secret: bytes | None, delivery: str,
               notice: dict[str, Any], now: float,
               timeout: float = TIMEOUT_SECONDS) -> None:
    """Send ``notice`` through ``ch``; ``SendError`` if it was not accepted."""
    if ch.kind == "webhook":
        await send_webhook(ch.settings, secret, delivery, notice, now, timeout)
    else:
        await send_email(ch.settings, secret, notice, timeout)


async def _finish(core: Core, row_id: int, **values: Any) -> None:
    async with core.sessionmaker() as s, s.begin():
        await s.execute(update(NotifyOutbox).where(NotifyOutbox.id == row_id).values(**values))


async def _deliver(core: Core, key_path: Path, row: NotifyOutbox) -> None:
    now = core.clock()
    async with core.sessionmaker() as s, s.begin():
        claimed = await s.execute(update(NotifyOutbox).where(
            NotifyOutbox.id == row.id, NotifyOutbox.state == PENDING,
            NotifyOutbox.next_attempt == row.next_attempt).values(
            next_attempt=now + LEASE_SECONDS))
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return  # another configuration server took it
        ch = await s.get(NotifyChannel, row.channel)
    attempt = row.attempts + 1
    try:
        if ch is None:
            raise SendError(f"channel {row.channel!r} was removed")
        await send(ch, open_secret(key_path, ch), str(row.id), row.notice, now)
    except SendError as e:
        done = ch is None or attempt >= MAX_ATTEMPTS
        retry_in = BACKOFF.delay(attempt - 1)
        await _finish(core, row.id, attempts=attempt, last_error=str(e),
                      state=FAILED if done else PENDING,
                      next_attempt=core.clock() + (0.0 if done else retry_in))
        core.metrics.notifications.labels(ch.kind if ch is not None else "removed",
                                          "gave_up" if done else "failed").inc()
        log.warning("notification_failed", channel=row.channel, delivery=row.id,
                    attempt=attempt, error=str(e), gave_up=done,
                    retry_in_seconds=None if done else round(retry_in, 1))
        return
    await _finish(core, row.id, attempts=attempt, state=DELIVERED, delivered=core.clock(),
                  last_error=None)
    core.metrics.notifications.labels(ch.kind, "delivered").inc()
    log.info("notification_delivered", channel=row.channel, delivery=row.id,
             notice_event=row.notice.get("event"), code=row.notice.get("code"),
             target=row.notice.get("target"), attempt=attempt)


async def deliver_due(core: Core, key_path: Path) -> float | None:
    """Send every row due now (one attempt each); remove finished rows past
    ``KEEP_SECONDS``. Returns when the next pending row is due (None: none is)."""
    now = core.clock()
    async with core.sessionmaker() as s:
        rows = (await s.execute(select(NotifyOutbox).where(
            NotifyOutbox.state == PENDING, NotifyOutbox.next_attempt <= now)
            .order_by(NotifyOutbox.id).limit(BATCH))).scalars().all()
    for row in rows:
        await _deliver(core, key_path, row)
    async with core.sessionmaker() as s, s.begin():
        await s.execute(delete(NotifyOutbox).where(
            NotifyOutbox.state != PENDING, NotifyOutbox.created < now - KEEP_SECONDS))
        nxt, pending = (await s.execute(select(
            func.min(NotifyOutbox.next_attempt), func.count()).where(
            NotifyOutbox.state == PENDING))).one()
    core.metrics.notify_pending.set(pending)
    return None if nxt is None else float(nxt)


async def run(core: Core, key_path: Path) -> None:
    """The delivery worker, for as long as the daemon runs."""
    backoff = Backoff(base=1.0, cap=IDLE_SECONDS)
    async with core.notifier.watching("notify-watch") as dirty:
        while True:
            dirty.clear()  # before the pass: a change during it means one more pass
            try:
                nxt = await deliver_due(core, key_path)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a catalog hiccup must not end delivery
                nxt = core.clock() + backoff.next()
                log.error("notification_pass_failed", error=str(e),
                          error_type=type(e).__name__)
            await asyncio.sleep(_MIN_GAP_S)
            wait = IDLE_SECONDS if nxt is None else min(IDLE_SECONDS, nxt - core.clock())
            await next_pass(dirty, 0.0, wait)
