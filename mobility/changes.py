"""Change trackers: which blocks of a disk may have changed since the last cycle.

A tracker answers, for one disk, the agent's last acknowledged cycle (``base``) and
the snapshot the new cycle reads, either ``Changed`` — a *superset* of the blocks
that differ from what ``base`` read — or ``Rescan`` — "I may have missed something"
(no base, a restart, state gone, anything unexpected). The sender then reads and
fingerprints only the ``Changed`` blocks and keeps ``base``'s fingerprints for the
others, so the new map is exactly what a full scan would produce; on ``Rescan`` it
reads the whole disk, as the full scan (``FullScan``) always does.

Trackers (one module each): ``FullScan`` here; ``ReflinkTracker``
(``reflinktrack.py``, images cloned by ``snapshot = "reflink"``);
``BlockTraceTracker`` (``blocktrace.py``, block devices, from tracefs). The agent
picks one per disk (``trackers.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Changed:
    """Sorted, disjoint block ranges ``[first, end)``: every block outside them holds
    what the base cycle read."""

    ranges: tuple[tuple[int, int], ...]

    @property
    def blocks(self) -> int:
        return sum(end - first for first, end in self.ranges)


@dataclass(frozen=True)
class Rescan:
    """The tracker cannot vouch for any block: read the whole disk. ``reason`` says why."""

    reason: str


Answer = Changed | Rescan


class Tracker(Protocol):
    """``kind`` names the tracker (``scan``, ``reflink``) in logs and cycle results."""

    kind: str

    def changes(self, base: str | None, cycle: str, path: str, size: int,
                block_size: int) -> Answer:
        """What changed since ``base`` (the last acknowledged cycle; None: a full or
        resync cycle, answer ``Rescan``) in ``path``, the snapshot cycle ``cycle``
        reads, of ``size`` bytes. Called on the scan thread once the snapshot is held,
        before any block is read; it prepares what the next cycle compares against.
        Never raises for a tracking problem: that is a ``Rescan``."""
        ...

    def close(self) -> None:
        """Let go of what the tracker holds (threads, tracing instances)."""
        ...


class FullScan:
    """No tracking: every cycle reads the whole disk (the portable fallback)."""

    kind = "scan"

    def changes(self, base: str | None, cycle: str, path: str, size: int,
                block_size: int) -> Answer:
        return Rescan("full scan configured")

    def close(self) -> None:
        pass

