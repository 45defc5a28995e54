"""The barrier of a consistency group's point: who waits for whom, and what a timeout does.

The members of a consistency group (``configserver/groups.py``) replicate through one
process server, which holds one barrier per group point. Each member's agent, at its
cycle boundary, opens a connection that speaks ``group`` and sends BARRIER twice:

1. ``phase: ready`` — it is at its cycle boundary and nothing is frozen yet. It waits
   until every member is ready, so that nobody freezes while another member is still
   in the middle of a cycle.
2. ``phase: frozen`` with its ``cycle`` — it has opened that cycle and stopped its
   writes (fsfreeze, the application's pre-script). It waits until every member is
   frozen: at that moment no member writes, so the disks of all members are at one
   common moment, and each member's cycle reads exactly that moment. Then all are
   released together, each thaws and sends its cycle as usual.

A phase's wait ends ``timeout_seconds`` after its first arrival. A member missing then
fails the group point: every member waiting gets ``ERROR group_point_failed`` naming
who did not arrive, and goes on with its own cycle (its own point is made as always; it
is simply not part of a group point). A member that arrives later, or whose snapshot
cannot hold its writes for the common moment (``held: false``), fails it too. Every
outcome — released with each member's cycle, or failed and why — is recorded in the
process server's database before any member is released, and reported from there to the
configuration server (``POST /api/v1/internal/group-points``; ``procserver/groupoutbox.py``
keeps it across a restart), which lists the group point and raises the event
``group_point_failed``. A member's cycle of a released group point that this process
server aborts later (its session ended and the cycle was not resumed, a newer cycle
superseded it) fails the group point: it is reported again, ``failed``, naming the member
and why. A barrier open when the process server stopped fails at its next
start.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from common.names import NAME as _NAME
from wire.protocol import FrameType, ProtocolError, encode_json, error_frame

if TYPE_CHECKING:
    from procserver.groupoutbox import GroupPointOutbox
    from procserver.session import Session

log = structlog.get_logger("procserver.barrier")
PHASES = ("ready", "frozen")
MAX_MEMBERS = 64
MAX_TIMEOUT = 3600.0
KEEP_OUTCOMES = 256  # recent outcomes kept: late arrivals learn the point is over
MAX_OPEN = 256  # barriers open at once
_ID = re.compile(r"^[0-9a-f]{32}$")


class BarrierFailed(Exception):
    """The group point failed: ``str(e)`` says why (the members that did not arrive)."""


@dataclass
class _Barrier:
    point: str
    group: str
    members: frozenset[str]
    timeout: float
    arrived: dict[str, set[str]] = field(default_factory=lambda: {p: set() for p in PHASES})
    deadline: dict[str, float] = field(default_factory=dict)
    done: dict[str, asyncio.Event] = field(
        default_factory=lambda: {p: asyncio.Event() for p in PHASES})
    cycles: dict[str, str] = field(default_factory=dict)
    failed: str | None = None
    over: bool = False  # its outcome is being recorded: nothing changes it any more
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # ...and is recorded


def _check(doc: dict[str, Any], machine: str) -> tuple[str, str, str, frozenset[str], float]:
    """``(point, group, phase, members, timeout)`` of a BARRIER, or ``ProtocolError``."""
    point, group, phase = doc.get("point"), doc.get("group"), doc.get("phase")
    members, timeout = doc.get("members"), doc.get("timeout_seconds")
    if not isinstance(point, str) or not _ID.match(point):
        raise ProtocolError("bad_barrier", "BARRIER: 'point' must be 32 hex digits")
    if not isinstance(group, str) or not _NAME.match(group):
        raise ProtocolError("bad_barrier", "BARRIER: 'group' must be a group's name")
    if phase not in PHASES:
        raise ProtocolError("bad_barrier", f"BARRIER: 'phase' must be one of {PHASES}")
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS or not all(
            isinstance(m, str) and _NAME.match(m) for m in members):
        raise ProtocolError("bad_barrier", f"BARRIER: 'members' must list 1 to "
                                           f"{MAX_MEMBERS} machine names")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
            not 0 < timeout <= MAX_TIMEOUT:
        raise ProtocolError("bad_barrier", f"BARRIER: 'timeout_seconds' must be a number "
                                           f"of seconds up to {MAX_TIMEOUT:g}")
    if machine not in members:
        raise ProtocolError("bad_barrier", f"BARRIER: machine {machine!r} is not a member "
                                           f"of group {group!r}")
    if phase == "frozen" and (not isinstance(doc.get("cycle"), str)
                              or not _ID.match(doc["cycle"])):
        raise ProtocolError("bad_barrier", "BARRIER frozen: 'cycle' must be the cycle "
                                           "this member opened")
    return point, group, phase, frozenset(members), float(timeout)


class Barriers:
    """Every group point's barrier on this process server. ``book`` (the process
    server's ``GroupPointOutbox``) records each barrier open and each outcome durably,
    the outcome before any member is released; ``report`` learns each outcome (the
    document ``POST /api/v1/internal/group-points`` takes); ``outcomes`` keeps the recent
    ones."""

    def __init__(self, report: Callable[[dict[str, Any]], None] | None = None, *,
                 book: GroupPointOutbox | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.report, self.book, self.clock, self.wall = report, book, clock, wall
        self._open: dict[str, _Barrier] = {}
        self.outcomes: collections.OrderedDict[str, dict[str, Any]] = \
            collections.OrderedDict()

    async def arrive(self, machine: str, doc: dict[str, Any]) -> dict[str, Any]:
        """``machine``'s BARRIER ``doc``: wait for the other members; the answer once all
        are in, ``BarrierFailed`` if the group point failed, ``ProtocolError`` for a
        malformed one."""
        point, group, phase, members, timeout = _check(doc, machine)
        over = self.outcomes.get(point)
        if over is not None:
            raise BarrierFailed(over.get("error") or f"group point {point} is over: it was "
                                "released before this member arrived")
        b = self._open.get(point)
        if b is None:
            if phase != "ready":
                raise BarrierFailed(f"group point {point} is not open here (a process "
                                    "server restarted, or every member left)")
            if len(self._open) >= MAX_OPEN:
                raise BarrierFailed(f"{MAX_OPEN} group points are open on this process "
                                    "server; try again at the next group point")
            b = self._open[point] = _Barrier(point, group, members, timeout)
            if self.book is not None:
                try:
                    await self.book.opened(point, group, sorted(members))
                except Exception as e:  # the database: the group point cannot be kept
                    await self._fail(b, f"the process server cannot record the group "
                                        f"point: {e}")
        if b.failed is None and not b.over:
            await self._join(b, machine, doc, phase, group, members)
        if b.failed is None and not b.done[phase].is_set():
            try:
                async with asyncio.timeout(max(0.0, b.deadline[phase] - self.clock())):
                    await b.done[phase].wait()
            except TimeoutError:
                if not b.over:
                    missing = sorted(b.members - b.arrived[phase])
                    await self._fail(b, f"{', '.join(missing)} did not reach the barrier "
                                        f"({phase}) within {b.timeout:g} s")
                await b.settled.wait()
        if b.failed is not None:
            raise BarrierFailed(b.failed)
        return {"point": point, "phase": phase, "released": True}

    async def cycle_dropped(self, machine: str, cycle: str, reason: str) -> None:
        """``machine``'s ``cycle`` was aborted here: a released group point that holds it
        fails (reported again, ``failed``: the catalog marks it so)."""
        for point, doc in list(self.outcomes.items()):
            if doc["state"] != "released" or doc["members"].get(machine) != cycle:
                continue
            failed = {**doc, "state": "failed",
                      "error": f"{machine}'s cycle {cycle} of this group point was dropped by "
                               f"the process server ({reason}) after the barrier released "
                               "it"}
            self.outcomes[point] = failed
            log.warning("group_point_failed", group=doc["group"], group_point=point,
                        error=failed["error"])
            if self.book is not None:
                try:
                    await self.book.finished(failed)
                except Exception as e:  # the catalog's own settling decides it then
                    log.error("group_point_not_recorded", group_point=point,
                              error=str(e) or type(e).__name__)
            if self.report is not None:
                self.report(failed)

    async def _join(self, b: _Barrier, machine: str, doc: dict[str, Any], phase: str,
                    group: str, members: frozenset[str]) -> None:
        if (b.group, b.members) != (group, members):
            await self._fail(b, f"the members of group {group!r} disagree on the group "
                                f"point: {machine} names {sorted(members)}, the first named "
                                f"{sorted(b.members)} (a membership change in between)")
            return
        if phase == "frozen":
            if machine not in b.arrived["ready"] or not b.done["ready"].is_set():
                await self._fail(b, f"{machine} froze before every member was ready")
                return
            if not doc.get("held", False):
                await self._fail(b, f"{machine}'s snapshot cannot hold its writes for the "
                                    "group's moment (a snapshot that lets writes go at once, "
                                    "or none): use fsfreeze or an application pre-script")
                return
            b.cycles[machine] = str(doc["cycle"])
        arrived = b.arrived[phase]
        arrived.add(machine)
        b.deadline.setdefault(phase, self.clock() + b.timeout)
        log.info("barrier_arrived", group=group, group_point=b.point, phase=phase,
                 machine=machine, waiting_for=sorted(b.members - arrived))
        if arrived == b.members:
            if phase == "frozen":  # the outcome durable before anyone is released
                await self._finish(b, None)
            b.done[phase].set()  # (a failure to record it: ``b.failed`` says so)

    async def _fail(self, b: _Barrier, why: str) -> None:
        if b.failed is None and not b.over:
            b.failed = why
            log.warning("group_point_failed", group=b.group, group_point=b.point, error=why,
                        hint="each member's own points go on; the next group point is "
                             "tried at the next interval")
            await self._finish(b, why)
        for e in b.done.values():
            e.set()

    async def _finish(self, b: _Barrier, error: str | None) -> None:
        b.over = True
        self._open.pop(b.point, None)
        doc: dict[str, Any] = {
            "id": b.point, "group": b.group, "created": self.wall(),
            "state": "failed" if error else "released",
            "members": {m: b.cycles.get(m) for m in sorted(b.members)}, "error": error}
        self.outcomes[b.point] = doc
        while len(self.outcomes) > KEEP_OUTCOMES:
            self.outcomes.popitem(last=False)
        try:
            if self.book is not None:
                await self.book.finished(doc)
        except Exception as e:  # not durable: no member may be told it was released
            log.error("group_point_not_recorded", group=b.group, group_point=b.point,
                      error=str(e) or type(e).__name__)
            if error is None:
                b.failed = doc["error"] = f"the process server cannot record the group " \
                                          f"point: {e}"
                doc["state"] = "failed"
        finally:
            b.settled.set()
        if doc["error"] is None:
            log.info("group_point_released", group=b.group, group_point=b.point,
                     cycles=doc["members"])
        if self.report is not None:
            self.report(doc)


async def serve_barrier(session: Session, doc: dict[str, Any]) -> None:
    """Answer one BARRIER: the release once every member is in, or ``ERROR
    group_point_failed``."""
    try:
        answer = await session.deps.barriers.arrive(session.machine, doc)
    except BarrierFailed as e:
        await session.send(error_frame(
            "group_point_failed", str(e), "this member's own cycle goes on; the next group "
            "point is tried at the group's next interval"))
        return
    await session.send(encode_json(FrameType.BARRIER, answer))
