"""Agent enrollment with the passphrase: who may get a machine certificate, and the
throttle on wrong passphrases.

An agent presents the configuration server's enrollment passphrase (as ASR's
configuration-server passphrase) and a machine name; it gets a client certificate for a
machine that is in the inventory and enabled. After ``Throttle.limit`` wrong passphrases
from one address within ``Throttle.window`` seconds, that address is refused for a while.
Refusals are domain errors; every outcome is counted in
``siterecovery_configserver_enrollments_total``.
"""

from __future__ import annotations

import hmac
from collections import deque

import structlog

from configserver import certs, db
from configserver.ca import CertificateAuthority, Issued
from configserver.core import Core
from configserver.errors import ItemStateError, NotFound, TooManyAttempts, Unauthenticated

log = structlog.get_logger("configserver.certs")


class Throttle:
    """Per client address: after ``limit`` wrong passphrases within ``window`` seconds,
    every attempt is refused until the oldest of them is ``window`` seconds old."""

    MAX_ADDRESSES = 10_000

    def __init__(self, limit: int = 5, window: float = 600.0) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, addr: str, now: float) -> deque[float]:
        q = self._failures.get(addr, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def retry_after(self, addr: str, now: float) -> float:
        """Seconds until ``addr`` may try again (0: now)."""
        q = self._recent(addr, now)
        if len(q) < self.limit:
            return 0.0
        return max(1.0, q[0] + self.window - now)

    def failed(self, addr: str, now: float) -> None:
        if len(self._failures) >= self.MAX_ADDRESSES:
            for a in [a for a in self._failures if not self._recent(a, now)]:
                del self._failures[a]
            while len(self._failures) >= self.MAX_ADDRESSES:  # all busy: forget the oldest
                del self._failures[next(iter(self._failures))]
        q = self._recent(addr, now)
        q.append(now)
        self._failures[addr] = q

    def succeeded(self, addr: str) -> None:
        self._failures.pop(addr, None)


async def enroll(core: Core, ca: CertificateAuthority, throttle: Throttle, passphrase: str,
                 *, machine: str, given: str, addr: str, days: float, passphrase_file: str
                 ) -> Issued:
    """Issue and record a certificate for ``machine`` to the caller at ``addr`` who gave the
    passphrase ``given``. Raises ``TooManyAttempts`` (throttled), ``Unauthenticated``
    (wrong passphrase), ``NotFound`` (no such machine) or ``ItemStateError`` (disabled)."""
    now = core.clock()
    outcomes = core.metrics.enrollments
    wait = throttle.retry_after(addr, now)
    if wait:
        outcomes.labels("throttled").inc()
        log.warning("enrollment_refused", machine=machine, peer=addr, reason="throttled")
        raise TooManyAttempts("too_many_attempts", "too many wrong passphrases from this "
                              "address", f"wait {wait:.0f} seconds, then try again with the "
                              "right passphrase")
    if not hmac.compare_digest(given.encode(), passphrase.encode()):
        throttle.failed(addr, now)
        outcomes.labels("wrong_passphrase").inc()
        log.warning("enrollment_refused", machine=machine, peer=addr, reason="wrong_passphrase")
        raise Unauthenticated("wrong_passphrase", "the enrollment passphrase is wrong",
                              "use the configuration server's passphrase: the file "
                              f"{passphrase_file} in its data directory "
                              f"(after {throttle.limit} wrong attempts within "
                              f"{throttle.window / 60:.0f} minutes this address must wait)")
    throttle.succeeded(addr)
    async with core.sessionmaker() as s:
        row = await s.get(db.Machine, machine)
    if row is None:
        outcomes.labels("machine_not_found").inc()
        raise NotFound("machine_not_found", f"no machine named {machine!r} in the inventory",
                       "the operator adds it first: siterecovery machine add (POST "
                       "/api/v1/machines)")
    if not row.enabled:
        outcomes.labels("machine_disabled").inc()
        raise ItemStateError("machine_disabled", f"machine {machine!r} is disabled",
                             f"enable it first: PATCH /api/v1/machines/{machine} "
                             '{"enabled": true}')
    issued = await certs.issue_agent(core, ca, machine, days)
    outcomes.labels("ok").inc()
    log.info("agent_enrolled", machine=machine, peer=addr, serial=issued.serial)
    return issued
