"""Whether uploads to the vault are failing, and since when: what the heartbeat reports so
that the configuration server can raise ``procserver_storage_failing`` (#12 item 3).

The uploader retries a failed upload for as long as it takes (the data is safe in the
cache); without this, a vault whose disk is full would fail every upload for hours with
nothing but log lines. Per machine, a failure starts a run of failures (its start is
kept, the error is updated) and any durable write to the vault — a checkpoint or a point —
ends it. The process server is failing while any machine is: since the earliest start,
with the newest error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ERROR_CHARS = 500  # the heartbeat's storage_error is at most this long


@dataclass
class _Failing:
    since: float
    error: str
    at: float


class StorageHealth:
    """Runs of failed uploads per machine; ``clock`` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing: dict[str, _Failing] = {}
        self._changed = asyncio.Event()  # set (and replaced) at every change

    @property
    def failing(self) -> bool:
        """Whether any machine's uploads are failing now."""
        return bool(self._failing)

    async def wait_until(self, failing: bool) -> None:
        """Return once ``failing`` is what ``failing`` says (for tests and the daemon)."""
        while self.failing is not failing:
            await self._changed.wait()

    def _change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def failed(self, machine: str, error: BaseException | str) -> None:
        """An upload of ``machine``'s data failed (it will be retried)."""
        text = error if isinstance(error, str) else (
            f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        now = self._clock()
        run = self._failing.get(machine)
        since = now if run is None else run.since
        self._failing[machine] = _Failing(since, text[:ERROR_CHARS], now)
        self._change()

    def succeeded(self, machine: str) -> None:
        """Something of ``machine``'s was written to the vault for good: its run ends."""
        if self._failing.pop(machine, None) is not None:
            self._change()

    forget = succeeded  # the machine's cycle was dropped or it has nothing left to upload

    def failing_seconds(self) -> float:
        """How long uploads have been failing without a success (0: they are not)."""
        if not self._failing:
            return 0.0
        return max(0.0, self._clock() - min(f.since for f in self._failing.values()))

    def heartbeat(self) -> dict[str, Any]:
        """The heartbeat's fields: ``storage_failing_seconds`` and ``storage_error`` (the
        newest failure's, None while uploads are not failing)."""
        if not self._failing:
            return {"storage_failing_seconds": 0.0, "storage_error": None}
        newest = max(self._failing.values(), key=lambda f: f.at)
        return {"storage_failing_seconds": round(self.failing_seconds(), 1),
                "storage_error": newest.error}
