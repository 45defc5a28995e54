"""Which recovery point an operator means: the one rule that restore, failover and every
other verb that takes a point use.

A *point spec* is one of

- ``latest``: the newest point;
- ``latest-app-consistent``: the newest point whose label is ``app``;
- ``latest-crash-consistent``: the newest point that is at least crash-consistent
  (``crash`` or ``app``: an app-consistent point is crash-consistent too);
- a point id, or a prefix of one that no other point shares.

"Newest" is the order the vault lists points in (``Vault.list_points``: by creation
time, then id). ``at`` narrows any spec to points created at or before a moment.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from common.labels import APP, CRASH
from vault.errors import AmbiguousPointError, NoSuchPointError
from vault.point import Point
from vault.retention import created_at

LATEST = "latest"
LATEST_APP = "latest-app-consistent"
LATEST_CRASH = "latest-crash-consistent"
SPECS = (LATEST, LATEST_APP, LATEST_CRASH)


def select_point(points: Sequence[Point], spec: str, *, machine: str | None = None,
                 at: datetime | None = None) -> Point:
    """The point ``spec`` names among ``points`` (any order).

    ``machine`` keeps only that machine's points. ``at`` (an aware datetime) keeps only
    points created at or before it. A ``latest*`` spec needs the points left to be of one
    machine: more than one raises AmbiguousPointError, as does an id prefix that several
    points share (an exact id always wins). Nothing matching raises NoSuchPointError,
    whose message names what was asked and what the points left are.
    """
    if at is not None and at.tzinfo is None:
        raise ValueError("select_point: 'at' must be an aware datetime")
    pool = [p for p in points if machine is None or p.machine == machine]
    if at is not None:
        pool = [p for p in pool if created_at(p) <= at]
    pool.sort(key=lambda p: (p.created, p.id))  # the vault's own listing order
    asked = repr(spec) + (f" for machine {machine!r}" if machine else "") \
        + (f" at or before {at.isoformat()}" if at is not None else "")
    if spec in SPECS:
        machines = sorted({p.machine for p in pool})
        if len(machines) > 1:
            raise AmbiguousPointError(f"{spec!r} needs one machine, and the points are of "
                                      f"several ({', '.join(machines)}): name one",
                                      machines=tuple(machines))
        if spec == LATEST_APP:
            cands = [p for p in pool if p.consistency == APP]
        elif spec == LATEST_CRASH:
            cands = [p for p in pool if p.consistency in (APP, CRASH)]
        else:
            cands = pool
    else:
        cands = [p for p in pool if p.id == spec] \
            or [p for p in pool if p.id.startswith(spec)]
        if len(cands) > 1:
            raise AmbiguousPointError(f"point id prefix {spec!r} is ambiguous: "
                                      f"{len(cands)} points start with it")
    if not cands:
        raise NoSuchPointError(f"no recovery point matches {asked}; {_what_exists(pool)}")
    return cands[-1]


def _what_exists(pool: list[Point]) -> str:
    """What the points that were searched are, for the message of a failed selection."""
    if not pool:
        return "there is no recovery point to choose from"
    counts = Counter(p.consistency for p in pool)
    labels = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
    newest = pool[-1]
    return (f"there {'is' if len(pool) == 1 else 'are'} {len(pool)} "
            f"({labels}), the newest {newest.id[:16]} of {newest.created}")
