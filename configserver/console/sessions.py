"""Console sessions: kept in memory on the server, each with its own CSRF token.

A session id is 256 random bits, sent to the browser only as an HttpOnly cookie; the
server keeps, per id, its CSRF token and when it expires. A session ends after
``IDLE_SECONDS`` without a request or ``MAX_SECONDS`` after sign-in, whichever comes
first, and at sign-out; all end when the configuration server restarts (sign in again).
The store is bounded: past ``MAX_SESSIONS`` the oldest sign-in is forgotten.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

IDLE_SECONDS = 30 * 60.0
MAX_SECONDS = 12 * 3600.0
MAX_SESSIONS = 1000


@dataclass
class Session:
    id: str = field(repr=False)
    csrf: str = field(repr=False)
    created: float
    seen: float


def same_secret(given: str | None, expected: str) -> bool:
    """Whether ``given`` is ``expected``, compared in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class SessionStore:
    """Sessions by id; ``clock`` gives UNIX seconds (tests age sessions with their own)."""

    def __init__(self, clock: Callable[[], float], idle: float = IDLE_SECONDS,
                 lifetime: float = MAX_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self.clock, self.idle, self.lifetime, self.limit = clock, idle, lifetime, limit
        self._sessions: dict[str, Session] = {}  # in sign-in order

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self) -> Session:
        now = self.clock()
        for sid in [sid for sid, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[sid]
        while len(self._sessions) >= self.limit:
            del self._sessions[next(iter(self._sessions))]
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        self._sessions[s.id] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        """The live session ``sid`` names (its idle time restarts), or None."""
        if not sid:
            return None
        s = self._sessions.get(sid)
        if s is None:
            return None
        now = self.clock()
        if self._expired(s, now):
            del self._sessions[sid]
            return None
        s.seen = now
        return s

    def end(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.seen > self.idle or now - s.created > self.lifetime
