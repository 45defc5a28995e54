"""A member's part in a consistency group's point (``procserver/barrier.py`` holds the
barrier): the group point due, and the member's gate through the barrier.

When a group point is due (``GroupCall``: the managed daemon learns the group from its
settings, ``mobility/daemon.py``), the next cycle opens a connection of its own to the
process server before its snapshot and sends ``BARRIER ready``; once every member is
ready it takes its hold, opens its cycle, stops its writes (fsfreeze, the pre-script),
and sends ``BARRIER frozen`` with the cycle's id; once every member is frozen it is
released and goes on as any cycle (thaw, send, END). A failed group point (a member
missing, a process server without the ``group`` feature) is logged and the cycle goes
on as an ordinary one: the member's own points never wait on the group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from mobility.link import Link
from mobility.snapshot import Held
from wire.protocol import FrameType, ProtocolError, RemoteError, encode_json, raise_if_error

log = structlog.get_logger("mobility.group")
MARGIN = 30.0  # seconds past the barrier's timeout before the agent stops waiting itself


@dataclass(frozen=True)
class GroupCall:
    """A group point due: its id, the group, every member and the barrier's timeout."""

    point: str
    group: str
    members: tuple[str, ...]
    timeout: float


def group_point_id(group: str, slot: int) -> str:
    """The id every member computes alike for the group's ``slot``-th interval."""
    return hashlib.blake2b(f"{group}\0{slot}".encode(), digest_size=16).hexdigest()


def due_call(group: str, members: tuple[str, ...], interval: float, timeout: float,
             wall: float) -> tuple[int, GroupCall]:
    """The slot ``wall`` (UNIX seconds) is in, and its group point."""
    slot = int(wall // interval)
    return slot, GroupCall(group_point_id(group, slot), group, members, timeout)


def holds_writes(snap: Held) -> bool:
    """Whether the hold keeps the disks at one moment while it lasts (fsfreeze, a
    pre-script, a quiesced disk) — not a snapshot that lets writes go at once."""
    return snap.label != "inconsistent" and not snap.released


@dataclass
class GroupOutcome:
    point: str
    group: str
    cycle: str | None = None
    released: bool = False
    error: str | None = None


class GroupGate:
    """One member's way through one group point's barrier, on its own connection."""

    def __init__(self, call: GroupCall, connect: Callable[[], Awaitable[Link]]) -> None:
        self.call, self.connect = call, connect
        self.link: Link | None = None
        self.outcome = GroupOutcome(call.point, call.group)

    def _doc(self, phase: str) -> dict[str, object]:
        c = self.call
        return {"point": c.point, "group": c.group, "members": list(c.members),
                "timeout_seconds": c.timeout, "phase": phase}

    async def _ask(self, doc: dict[str, object]) -> bool:
        assert self.link is not None
        try:
            self.link.send(encode_json(FrameType.BARRIER, doc))
            answer = await self.link.recv(self.call.timeout + MARGIN)
            raise_if_error(answer)
            if answer.type != FrameType.BARRIER or not answer.json().get("released"):
                raise ProtocolError("expected_barrier", f"got {answer.type.name}")
            return True
        except (RemoteError, ProtocolError, OSError) as e:
            return await self._failed(str(e))

    async def _failed(self, why: str) -> bool:
        self.outcome.error = why
        log.warning("group_point_failed", group=self.call.group, group_point=self.call.point,
                    error=why, hint="this cycle goes on as an ordinary one")
        await self.close()
        return False

    async def ready(self) -> bool:
        """At the cycle boundary: wait until every member is; False if the point failed."""
        try:
            self.link = await self.connect()
        except (RemoteError, ProtocolError, OSError) as e:
            return await self._failed(f"cannot reach the process server: {e}")
        if "group" not in self.link.features:
            return await self._failed("the process server does not speak 'group' (an "
                                      "older version): upgrade it")
        return await self._ask(self._doc("ready"))

    async def frozen(self, cycle: str, snap: Held) -> bool:
        """Writes stopped in ``cycle``: wait until every member's are, then go on."""
        if self.link is None:
            return False
        self.outcome.cycle = cycle
        doc = {**self._doc("frozen"), "cycle": cycle, "held": holds_writes(snap)}
        if not await self._ask(doc):
            return False
        self.outcome.released = True
        log.info("group_point_released", group=self.call.group, group_point=self.call.point,
                 cycle=cycle)
        await self.close()
        return True

    async def close(self) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            await link.close()


async def open_gate(call: GroupCall | None,
                    connect: Callable[[], Awaitable[Link]]) -> GroupGate | None:
    """The gate of ``call`` once every member is ready, or failed (its ``outcome`` says
    which); None when no group point is due."""
    if call is None:
        return None
    gate = GroupGate(call, connect)
    await gate.ready()
    return gate
