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
outcome — released with each member's cycle, or failed and why — is reported to the
configuration server (``POST /api/v1/internal/group-points``), which lists the group
point and raises the event ``group_point_failed``.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from common.backoff import Backoff
from common.names import NAME as _NAME
from wire.protocol import FrameType, ProtocolError, encode_json, error_frame

if TYPE_CHECKING:
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
    """Every group point's barrier on this process server. ``report`` gets each outcome
    (the document ``POST /api/v1/internal/group-points`` takes); ``outcomes`` keeps the
    recent ones."""

    def __init__(self, report: Callable[[dict[str, Any]], None] | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.report, self.clock, self.wall = report, clock, wall
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
        if (b.group, b.members) != (group, members):
            self._fail(b, f"the members of group {group!r} disagree on the group point: "
                          f"{machine} names {sorted(members)}, the first named "
                          f"{sorted(b.members)} (a membership change in between)")
        elif phase == "frozen":
            if machine not in b.arrived["ready"] or not b.done["ready"].is_set():
                self._fail(b, f"{machine} froze before every member was ready")
            elif not doc.get("held", False):
                self._fail(b, f"{machine}'s snapshot cannot hold its writes for the "
                              "group's moment (a snapshot that lets writes go at once, or "
                              "none): use fsfreeze or an application pre-script")
            else:
                b.cycles[machine] = str(doc["cycle"])
        if b.failed is None:
            arrived = b.arrived[phase]
            arrived.add(machine)
            b.deadline.setdefault(phase, self.clock() + b.timeout)
            log.info("barrier_arrived", group=group, group_point=point, phase=phase,
                     machine=machine, waiting_for=sorted(b.members - arrived))
            if arrived == b.members:
                b.done[phase].set()
                if phase == "frozen":
                    self._finish(b, None)
        if b.failed is None and not b.done[phase].is_set():
            try:
                async with asyncio.timeout(max(0.0, b.deadline[phase] - self.clock())):
                    await b.done[phase].wait()
            except TimeoutError:
                missing = sorted(b.members - b.arrived[phase])
                self._fail(b, f"{', '.join(missing)} did not reach the barrier "
                              f"({phase}) within {b.timeout:g} s")
        if b.failed is not None:
            raise BarrierFailed(b.failed)
        return {"point": point, "phase": phase, "released": True}

    def _fail(self, b: _Barrier, why: str) -> None:
        if b.failed is None:
            b.failed = why
            log.warning("group_point_failed", group=b.group, group_point=b.point, error=why,
                        hint="each member's own points go on; the next group point is "
                             "tried at the next interval")
            self._finish(b, why)
        for e in b.done.values():
            e.set()

    def _finish(self, b: _Barrier, error: str | None) -> None:
        self._open.pop(b.point, None)
        doc: dict[str, Any] = {
            "id": b.point, "group": b.group, "created": self.wall(),
            "state": "failed" if error else "released",
            "members": {m: b.cycles.get(m) for m in sorted(b.members)}, "error": error}
        self.outcomes[b.point] = doc
        while len(self.outcomes) > KEEP_OUTCOMES:
            self.outcomes.popitem(last=False)
        if error is None:
            log.info("group_point_released", group=b.group, group_point=b.point,
                     cycles=doc["members"])
        if self.report is not None:
            self.report(doc)


class GroupPointReports:
    """The outcomes on their way to the configuration server: a bounded queue, each
    retried with back-off until the catalog took it (or refused it, which is logged)."""

    def __init__(self, post: Callable[[dict[str, Any]], Awaitable[int]],
                 limit: int = KEEP_OUTCOMES) -> None:
        self.post = post
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(limit)

    def put(self, doc: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(doc)
        except asyncio.QueueFull:
            log.error("group_point_report_dropped", group_point=doc["id"],
                      hint="the configuration server has been away for long")

    async def run(self) -> None:
        while True:
            doc = await self.queue.get()
            backoff = Backoff(1.0, 60.0)
            while True:
                try:
                    status = await self.post(doc)
                except Exception as e:  # the configuration server is away: retried
                    log.warning("group_point_report_failed", group_point=doc["id"],
                                error=str(e) or type(e).__name__)
                    await asyncio.sleep(backoff.next())
                    continue
                if status >= 400:
                    log.error("group_point_report_refused", group_point=doc["id"],
                              status=status)
                break


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
