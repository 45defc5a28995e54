"""Time formatting shared by the agent, the servers and the vault."""

from __future__ import annotations

import re
from datetime import UTC, datetime

# Point and cycle times: UTC with microseconds and a literal Z.
UTC_MICROS = "%Y-%m-%dT%H:%M:%S.%fZ"
UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")


def now_iso() -> str:
    """Now, as ``2026-01-31T12:00:00.000000Z``."""
    return datetime.now(UTC).strftime(UTC_MICROS)


def iso_seconds(t: float) -> str:
    """A POSIX time as ``2026-01-31T12:00:00Z`` (seconds, UTC)."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
