"""The part of a cycle that holds the snapshot: BEGIN on the process server, each disk's
tracker asked what changed, the blocks read and sent; with ``fsfreeze`` and a cycle
that fits in ``freeze_spool_mb``, what it reads is copied into the spool and the
filesystems thawed before the first block is sent (``spool.py``).

A provider that offers ``prepare`` (``fsfreeze``, and ``script`` around it) decides its
label first and stops writes only when asked (``Held.freeze``): the cycle is opened
on the process server (BEGIN, READY) before that, so the freeze holds nothing that
waits on the network — only freeze, the trackers' cut, the copy into the spool and the
thaw (``cycle_frozen``, ``cycle_spooled``). Every write after the cut is one the
tracker names for the next cycle.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from common.timefmt import now_iso
from mobility.config import MobilityConfig
from mobility.cycleplan import Plan, fetch_basis, full_plan
from mobility.cyclesend import send_blocks
from mobility.groupcycle import GroupGate, open_gate
from mobility.link import Link
from mobility.resume import Conn
from mobility.sender import CycleDisk, Progress, Sender
from mobility.snapshot import Held, held
from mobility.spool import fill
from wire.protocol import FrameType, ProtocolError, encode_json, raise_if_error

if TYPE_CHECKING:
    from mobility.agent import Agent

log = structlog.get_logger("mobility")


class Retry(Exception):
    """The process server does not know the base: leave the hold, fetch a basis."""


@dataclass
class HoldFacts:
    """How long a cycle held its snapshot (fsfreeze: kept the filesystems frozen), and
    what it spooled."""

    held: float = 0.0  # seconds, every hold of the cycle together
    start: float = 0.0  # when the current hold began (monotonic)
    thawed: float | None = None  # when the current hold let writes go (spool)
    spooled: int = 0
    overflow: bool = False  # too much to spool: sent while the disks were held


@dataclass(frozen=True)
class HeldCycle:
    """A cycle whose blocks are all sent (durably, on a resumable link): END is left."""

    plan: Plan
    cycle: str
    consistency: str
    created: str
    sender: Sender
    resumes: int


async def begin(link: Link, cfg: MobilityConfig, plan: Plan, doc: dict[str, Any]) -> Plan:
    """BEGIN the cycle ``doc`` on ``plan``; READY, or the plan it ended up on."""
    doc.update(full=plan.full, base=plan.base)
    link.send(encode_json(FrameType.BEGIN, doc))
    ready = await link.recv(cfg.connect_timeout_seconds)
    if ready.type == FrameType.ERROR and ready.json().get("code") == "resync_required":
        log.warning("resync_required", reason=ready.json().get("message"), plan=plan.kind)
        if plan.kind == "delta" and "resync" in link.features:
            raise Retry
        plan = Plan("full", None, dict.fromkeys(plan.olds))
        doc.update(cycle=uuid.uuid4().hex, full=True, base=None)
        link.send(encode_json(FrameType.BEGIN, doc))
        ready = await link.recv(cfg.connect_timeout_seconds)
    raise_if_error(ready)
    if ready.type != FrameType.READY:
        raise ProtocolError("expected_ready", f"got {ready.type.name}")
    log.info("cycle_opened", cycle=doc["cycle"], kind=plan.kind,
             consistency=doc["consistency"])
    return plan


async def hold_and_send(agent: Agent, conn: Conn, plan: Plan, sizes: dict[str, int],
                        progress: Progress | None, on_kind: Callable[[str], None] | None,
                        verify: frozenset[str], facts: HoldFacts) -> HeldCycle:
    """Hold the snapshot, BEGIN the cycle and send its blocks; a base the process
    server does not know leaves the hold for a basis and starts again. With a group
    point due (``agent.group_call``), through its barrier (``groupcycle.py``)."""
    call, agent.group_call = agent.group_call, None
    gate = await open_gate(call, agent._connect)  # a group point: every member ready
    try:
        return await _hold_and_send(agent, conn, plan, sizes, progress, on_kind, verify,
                                    facts, gate)
    finally:
        if gate is not None:
            await gate.close()
            agent.last_group = gate.outcome


async def _hold_and_send(agent: Agent, conn: Conn, plan: Plan, sizes: dict[str, int],
                         progress: Progress | None, on_kind: Callable[[str], None] | None,
                         verify: frozenset[str], facts: HoldFacts,
                         gate: GroupGate | None) -> HeldCycle:
    cfg = agent.cfg
    prepare = getattr(agent.provider, "prepare", None)
    while True:
        held_from = facts.start = time.monotonic()
        facts.thawed, holding = None, False
        try:
            async with (prepare or agent.provider.hold)() as h:
                snap = held(h)
                holding = snap.freeze is None
                doc: dict[str, Any] = {
                    "cycle": uuid.uuid4().hex, "consistency": snap.label,
                    "disks": [{"name": d["name"], "size": sizes[d["name"]],
                               "block_size": cfg.block_size} for d in cfg.disks]}
                plan = await begin(conn.link, cfg, plan, doc)
                if snap.freeze is not None:  # opened: only now are writes stopped
                    held_from = facts.start = time.monotonic()
                    holding = True
                    await snap.freeze()
                    log.info("cycle_frozen", cycle=doc["cycle"],
                             seconds=round(time.monotonic() - held_from, 4))
                if gate is not None:  # every member frozen: one moment for the group
                    await gate.frozen(doc["cycle"], snap)
                created = now_iso()
                if on_kind is not None:
                    on_kind(plan.kind)
                sender, resumes = await _send(agent, conn, plan, doc, progress, snap, verify,
                                              facts)
            facts.held += (facts.thawed or time.monotonic()) - held_from
            return HeldCycle(plan, doc["cycle"], snap.label, created, sender, resumes)
        except Retry:  # BEGIN refused: with ``prepare``, before the freeze
            if holding:
                facts.held += time.monotonic() - held_from
            plan = await fetch_basis(conn.link, cfg, sizes) or full_plan(sizes)


async def _send(agent: Agent, conn: Conn, plan: Plan, doc: dict[str, Any],
                progress: Progress | None, snap: Held, verify: frozenset[str],
                facts: HoldFacts) -> tuple[Sender, int]:
    cfg, cycle = agent.cfg, doc["cycle"]
    sender = Sender(agent, [
        CycleDisk(i, d["name"], snap.path(d["path"]), doc["disks"][i]["size"],
                  plan.olds[d["name"]])
        for i, d in enumerate(cfg.disks)], plan.full, progress,
        cycle=cycle, base=plan.base if plan.kind == "delta" else None, verify=verify)
    await sender.open()
    try:
        await spool(cfg, sender, snap, facts)
        return sender, await send_blocks(agent._connect, cfg, conn, sender)
    finally:
        await sender.close()


async def spool(cfg: MobilityConfig, sender: Sender, snap: Held, facts: HoldFacts) -> None:
    """Where the hold can thaw early (fsfreeze): copy what the cycle reads into the
    spool (``spool.py``), then thaw, so that the disks are held for the copy alone."""
    limit = cfg.freeze_spool_mb << 20
    if snap.thaw is None or limit == 0:
        return
    copy_from = time.monotonic()
    got = await asyncio.to_thread(fill, sender.disks, cfg.block_size, limit)
    copied = time.monotonic() - copy_from
    if not got.fits:
        facts.overflow = True
        # Expected for a full copy or a scan (info); a warning when a tracker's
        # changes alone outgrew the spool.
        emit = log.warning if any(d.ranges is not None for d in sender.disks) else log.info
        emit("freeze_spool_overflow", cycle=sender.cycle, read_bytes=got.nbytes,
             spool_bytes=limit, hint="the filesystems stay frozen while this cycle is "
             "sent: raise freeze_spool_mb or shorten interval_seconds")
        return
    await snap.thaw()
    facts.thawed, facts.spooled = time.monotonic(), got.nbytes
    log.info("cycle_spooled", cycle=sender.cycle, bytes=got.nbytes,
             freeze_seconds=round(facts.thawed - facts.start, 4),
             copy_seconds=round(copied, 4))
