"""A daemon's start-up objects kept out of the garbage collector's full collections.

Once a daemon has started, most of its Python objects live as long as it does: the
modules and classes it imported, SQLAlchemy's mappers and compiled statements, the TLS
contexts, the pools. CPython's full (oldest-generation) collection walks every one of
them each time it runs, and it runs whenever enough new objects have survived — as at
the start of a cycle, when a burst of allocations follows an idle interval. Measured
in the embedded servers (both in one process, ~156 000 objects after their start): a
full collection takes 80-100 ms on the benchmark machine, and it fell on the first
database write of a cycle's ``BEGIN`` — the agent waited that long for ``READY``
(README "A cycle's start without a pause").

``settle_startup_heap`` (once, when a daemon has started and before its first cycle)
collects what start-up left behind, then *freezes* the rest (``gc.freeze``): those
objects move to a permanent generation that collections no longer walk, so a full
collection scans only what the daemon's work has allocated since. Frozen objects are
never freed, which is what they would be anyway (they live as long as the daemon).
Only the daemons' entry points call it, never a server's ``start``: a process that
starts and stops servers (the tests) would keep every frozen server's objects.
"""

from __future__ import annotations

import gc


def settle_startup_heap() -> int:
    """Collect start-up's garbage, freeze what is left; return how many objects were
    frozen (all frozen so far, this call's included)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
