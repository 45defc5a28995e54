"""Verification scans of tracked disks: which disks are due, what the scan found, and
the per-disk report heartbeats carry (``docs/REFERENCE.md`` §2, the trackers)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from mobility.sender import Sender
from mobility.tracker import AgentState, load_state

if TYPE_CHECKING:
    from mobility.agent import Agent

log = structlog.get_logger("mobility")


def verify_due(hours: float, state: AgentState | None) -> frozenset[str]:
    """The disks whose last whole read is ``hours`` old or more (0: never due)."""
    if hours <= 0 or state is None:
        return frozenset()
    now = time.time()
    return frozenset(name for name, ds in state.disks.items()
                     if now - ds.verified_at >= hours * 3600)


def report_verification(sender: Sender, cycle: str) -> None:
    """Log what the cycle's verification scans found (after the acknowledgement)."""
    for disk, blocks in sender.missed.items():
        tracker = sender.tracking.get(disk, "")
        if not blocks:
            log.info("tracker_verified", disk=disk, tracker=tracker, cycle=cycle)
            continue
        log.error("tracker_missed_writes", disk=disk, tracker=tracker, cycle=cycle,
                  blocks=len(blocks), first_block=min(blocks),
                  hint="this cycle's point holds them (the verification read every "
                       "block), but points since the last verification may lack them; "
                       "set tracker = \"scan\" in mobility.toml until the cause is known")


def tracker_report(agent: Agent) -> dict[str, dict[str, Any]]:
    """Per disk: its tracker, when a cycle last read it whole (UNIX seconds; None: not
    known), and how many changed blocks the last verification scan found its tracker
    had missed — from the agent's committed state; what heartbeats carry."""
    state = load_state(agent.state_dir)
    out: dict[str, dict[str, Any]] = {}
    for name, tracker in agent.trackers.items():
        ds = state.disks.get(name) if state is not None else None
        out[name] = {"tracker": tracker.kind,
                     "verified_at": (ds.verified_at or None) if ds is not None else None,
                     "missed_blocks": ds.missed_blocks if ds is not None else 0}
    return out
