"""Consistency labels of a recovery point (invariant 4: honest labels).

``app``: the pre/post hooks ran around a frozen state. ``crash``: read from a
point-in-time snapshot or an equivalent frozen state. ``inconsistent``: anything
else (a scan of a live disk).
"""

from __future__ import annotations

APP = "app"
CRASH = "crash"
INCONSISTENT = "inconsistent"
CONSISTENCY = (APP, CRASH, INCONSISTENT)
