"""The RPO history of an item as a small bar chart (drawn as SVG by the template).

An item's RPO at any moment is the age of its latest recovery point, so its worst value
between two points is the gap between them: one bar per gap (the RPO reached just before
each point arrived), and a last bar for the RPO now, against the policy's threshold.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from configserver.items import point_time

WIDTH, HEIGHT = 320.0, 64.0  # the SVG's viewBox
BARS = 30  # the newest gaps shown


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    seconds: float
    over: bool
    now: bool  # the last bar: the RPO now, still growing


@dataclass(frozen=True)
class RpoChart:
    bars: tuple[Bar, ...]
    threshold_y: float | None  # where the threshold's line is drawn (None: no policy)
    worst: float  # the largest RPO shown, in seconds
    over: int  # how many bars exceed the threshold


def rpo_chart(points: Sequence[dict[str, Any]], now: float, threshold: float | None
              ) -> RpoChart | None:
    """The chart for ``points`` (API documents, any order), or None without a point."""
    times = sorted(point_time(p, now) for p in points)
    if not times:
        return None
    gaps = [b - a for a, b in itertools.pairwise(times)][-(BARS - 1):]
    values = [*gaps, max(0.0, now - times[-1])]
    top = max([*values, threshold or 0.0, 1.0]) * 1.1
    step = WIDTH / BARS
    bars = []
    for i, v in enumerate(values):
        h = max(1.0, v / top * HEIGHT)
        bars.append(Bar(x=round(i * step + 1, 1), y=round(HEIGHT - h, 1),
                        width=round(step - 2, 1), height=round(h, 1), seconds=v,
                        over=threshold is not None and v > threshold,
                        now=i == len(values) - 1))
    line = None if threshold is None else round(HEIGHT - threshold / top * HEIGHT, 1)
    return RpoChart(tuple(bars), line, max(values), sum(b.over for b in bars))
