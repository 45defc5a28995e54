"""Rate-limited log lines: at most one per key (a peer address, say) per interval, each
saying how many were suppressed since the one before, so a flood of bad handshakes
leaves a trace in the log without filling it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# A key for everything once ``max_keys`` distinct keys are being tracked: many peers at
# once (a scan, a botnet) still give one line per interval, not one per peer.
OVERFLOW = "*"


@dataclass
class _Slot:
    last: float  # when the last line for this key was logged (clock seconds)
    suppressed: int = 0


class LogThrottle:
    """``admit(key)`` says whether to log an event now, and how many were held back."""

    def __init__(self, interval: float = 60.0, *, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.max_keys, self.clock = interval, max_keys, clock
        self._slots: dict[str, _Slot] = {}

    def admit(self, key: str) -> int | None:
        """None: do not log this event (it is counted). An int: log it now; the int is
        the number of events for ``key`` suppressed since its previous line."""
        now = self.clock()
        if key not in self._slots and len(self._slots) >= self.max_keys:
            self._forget_before(now - self.interval)
            if len(self._slots) >= self.max_keys:
                key = OVERFLOW
        slot = self._slots.get(key)
        if slot is None:
            self._slots[key] = _Slot(now)
            return 0
        if now - slot.last < self.interval:
            slot.suppressed += 1
            return None
        suppressed, slot.last, slot.suppressed = slot.suppressed, now, 0
        return suppressed

    def _forget_before(self, t: float) -> None:
        # A key whose interval has passed may be dropped: its next event is logged anyway.
        # (Its suppressed count goes unreported; the metric keeps the total.)
        for k in [k for k, s in self._slots.items() if s.last < t and k != OVERFLOW]:
            del self._slots[k]
