"""Retention: which recovery points to keep (ASR-style thinning).

Per machine: the newest point and the newest app-consistent point are always
kept. Every point younger than ``keep_all_hours`` is kept. Older ones, up to
``retention_hours``, are thinned to one per hour until ``hourly_hours``, one per
2 hours until ``two_hourly_hours``, then one per 4 hours — in each bucket the
newest app-consistent point if there is one, else the newest point. Points past
``retention_hours`` are forgotten.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from vault.point import Point


@dataclass(frozen=True)
class Retention:
    keep_all_hours: float = 1.0
    hourly_hours: float = 24.0
    two_hourly_hours: float = 48.0
    retention_hours: float = 72.0

    def validate(self) -> None:
        if not (0 <= self.keep_all_hours <= self.hourly_hours <= self.two_hourly_hours
                <= self.retention_hours):
            raise ValueError("retention windows must grow: keep-all <= hourly <= 2-hourly "
                             "<= retention")


def created_at(p: Point) -> datetime:
    return datetime.strptime(p.created, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def plan(points: list[Point], policy: Retention, now: datetime) -> dict[str, str]:
    """Return ``{point id: why it is kept}``; every other point may be forgotten."""
    policy.validate()
    keep: dict[str, str] = {}
    by_machine: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        by_machine[p.machine].append(p)
    for pts in by_machine.values():
        pts.sort(key=lambda p: (p.created, p.id))
        keep.setdefault(pts[-1].id, "newest")
        app = [p for p in pts if p.consistency == "app"]
        if app:
            keep.setdefault(app[-1].id, "newest app-consistent")
        buckets: dict[tuple[int, int], Point] = {}
        for p in pts:
            when = created_at(p)
            age = (now - when).total_seconds() / 3600
            if age <= policy.keep_all_hours:
                keep.setdefault(p.id, "inside the keep-all window")
                continue
            if age > policy.retention_hours:
                continue
            hours = 1 if age <= policy.hourly_hours else 2 if age <= policy.two_hourly_hours \
                else 4
            key = (hours, int(when.timestamp() // (hours * 3600)))
            best = buckets.get(key)
            # Oldest first: a later point replaces the bucket's choice unless that would
            # trade an app-consistent point for a crash-consistent one.
            if best is None or p.consistency == "app" or best.consistency != "app":
                buckets[key] = p
        for (hours, _), p in buckets.items():
            keep.setdefault(p.id, f"newest of its {hours}-hour bucket")
    return keep
