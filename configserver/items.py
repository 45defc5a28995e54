"""Replicated items: state, health, progress, RPO and latest points.

An item exists from "Enable protection" until "Disable protection" removes it.
Its ``state`` is one of ``ItemState`` (the one place the set is defined); the
jobs move it along, agent progress reports and recovery points feed it.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

import structlog

from configserver import db
from configserver.agentversion import AGENT
from configserver.core import Core
from configserver.recovery import RECOVERY, RecoverySettings
from configserver.schema import iso, nullable, obj

log = structlog.get_logger("configserver.items")


class ItemState(StrEnum):
    """Every state a replicated item can be in."""

    ENABLING = "enabling"                        # Enable protection is running
    INITIAL_REPLICATION = "initial_replication"  # the agent copies every disk in full
    PROTECTED = "protected"                      # delta replication; points keep coming
    RESYNC_REQUIRED = "resync_required"          # the next cycle must be a full one
    RESYNCING = "resyncing"                      # that full cycle is under way
    DISABLING = "disabling"                      # Disable protection is running
    ENABLE_FAILED = "enable_failed"              # Enable/Finalize protection failed or was
    #                                              cancelled; enable again or disable
    # Failover (configserver/failover.py). A drill leaves production alone: replication
    # goes on during it. A failover stops replication for good (until reprotect).
    TEST_FAILOVER_IN_PROGRESS = "test_failover_in_progress"  # Test failover is running
    TEST_FAILOVER_DONE = "test_failover_done"    # the drill ended; Cleanup test failover next
    FAILOVER_IN_PROGRESS = "failover_in_progress"  # Failover (or Change recovery point) runs
    FAILED_OVER = "failed_over"                  # the machine runs on the target; commit next
    COMMITTED = "committed"                      # failover committed; the points are gone
    FAILBACK_IN_PROGRESS = "failback_in_progress"  # Failback: back onto the original machine
    REPROTECTED = "reprotected"                  # the recovered machine is in the vault


STATE_TITLES = {
    ItemState.ENABLING: "Enabling protection",
    ItemState.INITIAL_REPLICATION: "Initial replication in progress",
    ItemState.PROTECTED: "Protected",
    ItemState.RESYNC_REQUIRED: "Resynchronization required",
    ItemState.RESYNCING: "Resynchronization in progress",
    ItemState.DISABLING: "Disabling protection",
    ItemState.ENABLE_FAILED: "Enabling protection failed",
    ItemState.TEST_FAILOVER_IN_PROGRESS: "Test failover in progress",
    ItemState.TEST_FAILOVER_DONE: "Test failover done: clean it up",
    ItemState.FAILOVER_IN_PROGRESS: "Failover in progress",
    ItemState.FAILED_OVER: "Failed over",
    ItemState.COMMITTED: "Failover committed",
    ItemState.FAILBACK_IN_PROGRESS: "Failback in progress",
    ItemState.REPROTECTED: "Re-protected: the recovered machine replicates to the vault",
}
# States in which Enable protection/Finalize protection still own the item.
ENABLING_STATES = (ItemState.ENABLING, ItemState.INITIAL_REPLICATION)
# States in which the agent should replicate (settings tell it so).
REPLICATING_STATES = (ItemState.ENABLING, ItemState.INITIAL_REPLICATION, ItemState.PROTECTED,
                      ItemState.RESYNC_REQUIRED, ItemState.RESYNCING,
                      ItemState.TEST_FAILOVER_IN_PROGRESS, ItemState.TEST_FAILOVER_DONE)
# States a failover owns: the agent no longer replicates, progress reports change nothing.
FAILOVER_STATES = (ItemState.FAILOVER_IN_PROGRESS, ItemState.FAILED_OVER, ItemState.COMMITTED,
                   ItemState.FAILBACK_IN_PROGRESS, ItemState.REPROTECTED)
# A drill: replication goes on, but a progress report does not move the state (the drill's
# jobs own it until Cleanup test failover).
DRILL_STATES = (ItemState.TEST_FAILOVER_IN_PROGRESS, ItemState.TEST_FAILOVER_DONE)
HEALTHS = ("normal", "warning", "critical")

PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
ITEM = obj({
    "machine": {"type": "string"},
    "policy": {"type": "string"},
    "state": {"enum": [s.value for s in ItemState]},
    "state_description": {"type": "string"},
    "health": {"enum": list(HEALTHS)},
    "health_errors": {"type": "array", "items": {"type": "string"}},
    "initial_progress": PERCENT,
    "resync_progress": nullable(PERCENT),
    "disks": {"type": "object", "additionalProperties": PERCENT},
    "rpo_seconds": nullable({"type": "number"}),
    "rpo_threshold_seconds": nullable({"type": "integer"}),
    "latest_point": nullable({"type": "string"}),
    "latest_point_time": nullable({"type": "string"}),
    "latest_app_point": nullable({"type": "string"}),
    "latest_app_point_time": nullable({"type": "string"}),
    "created": {"type": "string"},
    "updated": {"type": "string"},
    "recovery": RECOVERY,
    "last_drill": nullable({"type": "object", "description": "the last test failover as its "
                            "jobs recorded it: job, point, checks, boot, rto_seconds, result, "
                            "cleanup notes"}),
    "failover": nullable({"type": "object", "description": "the failover under way or done: "
                          "job, point, checks, rto_seconds, committed"}),
    "last_successful_drill": nullable(obj({
        "time": {"type": "string", "description": "when the drill ended"},
        "job": nullable({"type": "string"}),
        "point": nullable({"type": "string"}),
        "rto_seconds": nullable({"type": "number"}),
        "age_days": {"type": "number", "minimum": 0},
    }, ["time", "job", "point", "rto_seconds", "age_days"])),
    "agent": AGENT,  # items list/show only (configserver/agentversion.py)
    "direction": nullable({"enum": ["forward", "reverse"], "description": (
        "what replicates into the vault: forward, the protected machine; reverse, the "
        "recovered machine after a re-protect; null: nothing (failed over, committed, a "
        "failback under way)")}),
}, ["machine", "policy", "state", "state_description", "health", "health_errors",
    "initial_progress", "resync_progress", "disks", "rpo_seconds", "rpo_threshold_seconds",
    "latest_point", "latest_point_time", "latest_app_point", "latest_app_point_time",
    "created", "updated", "recovery", "last_drill", "failover", "last_successful_drill"])
DAY = 86400.0


def last_good_drill(drill: dict[str, Any] | None) -> dict[str, Any] | None:
    """The item's last *successful* drill (``job``, ``ended``, ``point``, ``rto_seconds``)
    from its ``last_drill`` record, or None if it never had one.

    The record is the newest drill; a successful one copies its summary into
    ``last_success``, which a newer drill keeps, so a drill that fails later does not
    erase it. A record written before that existed counts when its own result is a success.
    """
    if not drill:
        return None
    if drill.get("result") == "succeeded" and drill.get("ended") is not None:
        return {"job": drill.get("job"), "ended": float(drill["ended"]),
                "point": drill.get("point"), "rto_seconds": drill.get("rto_seconds")}
    good = drill.get("last_success")
    if isinstance(good, dict) and good.get("ended") is not None:
        return {"job": good.get("job"), "ended": float(good["ended"]),
                "point": good.get("point"), "rto_seconds": good.get("rto_seconds")}
    return None


def _worst(a: str, b: str) -> str:
    return max(a, b, key=HEALTHS.index)


def item_doc(item: db.ReplicatedItem, policy: db.Policy | None, now: float) -> dict[str, Any]:
    """The API view of an item; health adds what is true now (RPO, resync) to what the jobs
    recorded (a failed Enable protection)."""
    state = ItemState(item.state)
    health = item.health if item.health in HEALTHS else "critical"
    errors = list(item.health_errors or [])
    rpo = None if item.latest_point_time is None else max(0.0, now - item.latest_point_time)
    threshold = policy.rpo_threshold_s if policy is not None else None
    if state in (ItemState.PROTECTED, ItemState.RESYNCING, ItemState.RESYNC_REQUIRED) \
            and rpo is not None and threshold is not None and rpo > threshold:
        health = _worst(health, "warning")
        errors.append(f"RPO {rpo:.0f} s exceeds the policy's threshold of {threshold} s")
    if state is ItemState.RESYNC_REQUIRED:
        health = _worst(health, "critical")
        errors.append("resynchronization required: the next cycle copies every disk in full")
    good = last_good_drill(item.last_drill)
    return {
        "machine": item.machine, "policy": item.policy, "state": state.value,
        "state_description": STATE_TITLES[state], "health": health, "health_errors": errors,
        "initial_progress": round(item.initial_progress, 2),
        "resync_progress": None if item.resync_progress is None
        else round(item.resync_progress, 2),
        "disks": dict(item.disk_progress or {}),
        "rpo_seconds": None if rpo is None else round(rpo, 1),
        "rpo_threshold_seconds": threshold,
        "latest_point": item.latest_point, "latest_point_time": iso(item.latest_point_time),
        "latest_app_point": item.latest_app_point,
        "latest_app_point_time": iso(item.latest_app_point_time),
        "created": iso(item.created), "updated": iso(item.updated),
        "recovery": RecoverySettings.stored(item.recovery).doc(item.machine),
        "last_drill": item.last_drill, "failover": item.failover,
        "direction": "reverse" if state is ItemState.REPROTECTED
        else "forward" if state in REPLICATING_STATES else None,
        "last_successful_drill": None if good is None else {
            "time": iso(good["ended"]), "job": good["job"], "point": good["point"],
            "rto_seconds": good["rto_seconds"],
            "age_days": round(max(0.0, now - good["ended"]) / DAY, 2)},
    }


def point_time(doc: dict[str, Any], default: float) -> float:
    """A point report's ``created`` (ISO 8601) as UNIX seconds."""
    try:
        t = dt.datetime.fromisoformat(str(doc.get("created", "")))
    except ValueError:
        return default
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


async def point_recorded(core: Core, doc: dict[str, Any]) -> None:
    """A new recovery point reached the catalog: update its item, wake waiting jobs.

    The latest point only moves forward (reports can arrive out of order).
    """
    machine = str(doc["machine"])
    async with core.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, machine, with_for_update=True)
        if item is not None and item.state != ItemState.DISABLING:
            t = point_time(doc, core.clock())
            if item.latest_point_time is None or t >= item.latest_point_time:
                item.latest_point, item.latest_point_time = str(doc["id"]), t
            if doc.get("consistency") == "app" and (
                    item.latest_app_point_time is None or t >= item.latest_app_point_time):
                item.latest_app_point, item.latest_app_point_time = str(doc["id"]), t
            item.updated = core.clock()
            await s.commit()
            log.info("item_point_updated", machine=machine, point=doc["id"])
    await core.notify()


def expected_disks(machine: db.Machine, progress: dict[str, float]) -> list[str]:
    """The disks initial replication must finish: the machine's inventory, or (when the
    inventory lists none) what the agent reported."""
    names = [str(d["name"]) for d in (machine.disks or []) if "name" in d]
    return names or sorted(progress)


def mean_progress(machine: db.Machine, progress: dict[str, float]) -> float:
    names = expected_disks(machine, progress)
    if not names:
        return 0.0
    return sum(min(100.0, float(progress.get(n, 0.0))) for n in names) / len(names)


def apply_progress(item: db.ReplicatedItem, machine: db.Machine, disks: dict[str, float],
                   resync: bool, now: float) -> None:
    """An agent's progress report: per-disk percentages, then the item's totals and state.

    During enabling/initial replication the report is initial-replication progress. Once
    protected, ``resync`` starts (or continues) a resynchronization; the item is protected
    again when every disk reached 100 %.
    """
    state = ItemState(item.state)
    if state in (ItemState.DISABLING, ItemState.ENABLE_FAILED, *FAILOVER_STATES):
        return
    if state in DRILL_STATES:
        item.disk_progress = {**(item.disk_progress or {}),
                              **{k: float(v) for k, v in disks.items()}}
        item.updated = now
        return
    starting_resync = resync and state not in ENABLING_STATES and state is not \
        ItemState.RESYNCING
    base = {} if starting_resync else (item.disk_progress or {})  # a resync starts from 0 %
    merged = {**base, **{k: float(v) for k, v in disks.items()}}
    item.disk_progress = merged
    total = mean_progress(machine, merged)
    if state in ENABLING_STATES:
        item.initial_progress = total
    elif resync or state is ItemState.RESYNCING:
        if total >= 100.0:
            item.state, item.resync_progress = ItemState.PROTECTED, None
        else:
            item.state, item.resync_progress = ItemState.RESYNCING, total
    item.updated = now
