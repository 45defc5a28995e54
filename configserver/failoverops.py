"""The failover requests: the checks and catalog changes behind ``POST
/api/v1/items/{machine}/test-failover|cleanup-test-failover|failover|change-recovery-point
|commit`` and ``PATCH /api/v1/items/{machine}/recovery``.

Each verb is allowed in some item states only (``ALLOWED``); elsewhere it raises
``ItemStateError`` saying the state and what to do. A recovery verb moves the item to its
in-progress state and queues its job in one transaction (the job's steps are
``configserver/failover.py``). Other refusals: ``NotFound`` (no such item),
``InvalidRequest`` (a setting, a time). Callers notify after a success.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import structlog

from configserver import db
from configserver.core import Core
from configserver.errors import InvalidRequest, ItemStateError, NotFound
from configserver.items import ItemState, item_doc
from configserver.jobdefs import JobKind, active_kinds, new_job
from configserver.recovery import RecoverySettings, apply
from targets.instant import INSTANT_TARGETS, refusal

log = structlog.get_logger("configserver.failover")

S = ItemState
# verb -> (job kind, the states it may start from, the state it moves the item to)
ALLOWED: dict[str, tuple[str, tuple[ItemState, ...], ItemState | None]] = {
    "test-failover": ("test_failover", (S.PROTECTED,), S.TEST_FAILOVER_IN_PROGRESS),
    "cleanup-test-failover": ("cleanup_test_failover", (S.TEST_FAILOVER_DONE,), None),
    "failover": ("failover", (S.PROTECTED, S.RESYNC_REQUIRED, S.RESYNCING,
                              S.FAILOVER_IN_PROGRESS), S.FAILOVER_IN_PROGRESS),
    "change-recovery-point": ("change_recovery_point", (S.FAILED_OVER, S.FAILOVER_IN_PROGRESS),
                              S.FAILOVER_IN_PROGRESS),
    "commit": ("commit_failover", (S.FAILED_OVER,), None),
    "failback": ("failback", (S.FAILED_OVER, S.COMMITTED, S.REPROTECTED),
                 S.FAILBACK_IN_PROGRESS),
    "reprotect": ("reprotect", (S.FAILED_OVER, S.COMMITTED, S.REPROTECTED), None),
}
HINTS = {
    S.TEST_FAILOVER_IN_PROGRESS: "wait for the test failover to end",
    S.TEST_FAILOVER_DONE: "clean the drill up first: siterecovery failover cleanup {m} "
                          "--notes TEXT",
    S.FAILOVER_IN_PROGRESS: "wait for the failover to end",
    S.FAILED_OVER: "the machine is failed over: change its point, commit, re-protect or fail "
                   "back: siterecovery failover change-point|commit|reprotect|failback {m}",
    S.COMMITTED: "the failover is committed; nothing is left to fail over (fail back: "
                 "siterecovery failover failback {m})",
    S.FAILBACK_IN_PROGRESS: "wait for the failback to end",
    S.REPROTECTED: "the recovered machine is re-protected: fail back (siterecovery failover "
                   "failback {m}) or re-protect again (siterecovery failover reprotect {m})",
}
LOCKED_SETTINGS = (S.TEST_FAILOVER_IN_PROGRESS, S.FAILOVER_IN_PROGRESS)


def _no_item(name: str) -> NotFound:
    return NotFound("item_not_found", f"machine {name!r} is not replicated",
                    f"enable replication: siterecovery replication enable {name}")


def _refuse(verb: str, name: str, state: ItemState, allowed: tuple[ItemState, ...]
            ) -> ItemStateError:
    hint = HINTS.get(state, "wait until the item is protected: siterecovery items show {m}")
    return ItemStateError("failover_not_allowed",
                          f"cannot {verb.replace('-', ' ')} {name!r}: the item is {state} "
                          f"(allowed in: {', '.join(allowed)})", hint.format(m=name))


def _at(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest("invalid_time", f"at: {value!r} is not a time",
                             "give an ISO 8601 time: 2026-12-05T10:00:00Z") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).isoformat()


def one_way_to_read(body: dict[str, Any]) -> None:
    """A running recovered domain is read paused or copied live, not both; its own agent
    reads it without either."""
    if body.get("pause") and body.get("live"):
        raise InvalidRequest("conflicting_options", "pause and live are two ways of reading "
                             "a running recovered machine: choose one",
                             "live keeps the guest running; pause needs no scratch space")
    if body.get("agent") and (body.get("pause") or body.get("live")):
        raise InvalidRequest("conflicting_options", "agent replicates the recovered machine "
                             "through its own agent: nothing is read on the host, so pause "
                             "and live do not apply", "give agent alone")


async def request(core: Core, kinds: Mapping[str, JobKind], verb: str, name: str,
                  body: dict[str, Any], tags: Mapping[str, Any] | None = None) -> db.Job:
    """Check that ``verb`` may run on item ``name`` now, move the item and queue the job;
    the job. ``body``: point, at, network, notes, shutdown_source, shutdown_timeout_seconds,
    drain_timeout_seconds, instant, hydrate_rate_mbps (what the verb takes); ``instant``
    on a target that cannot do it is refused (``InvalidRequest``). ``tags`` go into the
    job's parameters as they are (a recovery plan's job names itself there)."""
    kind_name, allowed, moves_to = ALLOWED[verb]
    one_way_to_read(body)
    if verb == "cleanup-test-failover" and not str(body.get("notes") or "").strip():
        raise InvalidRequest("notes_required", "cleaning up a test failover needs notes: what "
                             "the drill showed", "pass --notes TEXT")
    params: dict[str, Any] = {k: body[k] for k in (
        "point", "network", "notes", "shutdown_source", "shutdown_timeout_seconds",
        "drain_timeout_seconds", "instant", "hydrate_rate_mbps", "timeout_seconds", "pause",
        "live", "agent", "wait_seconds")
        if body.get(k)}
    if body.get("at"):
        params["at"] = _at(body["at"])
    params.update(tags or {})
    now = core.clock()
    async with core.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name, with_for_update=True)
        if item is None:
            raise _no_item(name)
        kind = RecoverySettings.stored(item.recovery).target
        if params.get("instant") and kind not in INSTANT_TARGETS:
            raise InvalidRequest("instant_not_supported", refusal(kind),
                                 f"siterecovery failover settings {name} --target libvirt")
        state = ItemState(item.state)
        if state not in allowed:
            raise _refuse(verb, name, state, allowed)
        active = await active_kinds(s, name)
        if active:
            raise ItemStateError("job_running", f"{name!r} has a job running or queued "
                                 f"({', '.join(active)})",
                                 f"wait for it: siterecovery jobs list --target {name}")
        params["from_state"] = state.value
        if moves_to is not None:
            item.state, item.updated = moves_to, now
        job = new_job(kinds[kind_name], name, params, now)
        s.add(job)
        await s.commit()
    log.info("failover_requested", verb=verb, machine=name, job=job.id)
    return job


async def update_settings(core: Core, name: str, change: dict[str, Any]) -> dict[str, Any]:
    """Change item ``name``'s recovery settings (null: back to the default); the item's
    document. Refused while a recovery of it runs (the job reads them)."""
    now = core.clock()
    async with core.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, name, with_for_update=True)
        if item is None:
            raise _no_item(name)
        if item.state in LOCKED_SETTINGS:
            raise ItemStateError("recovery_settings_locked", f"{name!r} is {item.state}: its "
                                 "recovery settings cannot change until that ends",
                                 f"follow it: siterecovery jobs list --target {name}")
        machine = await s.get(db.Machine, name)
        disks = [str(d["name"]) for d in (machine.disks if machine else []) if "name" in d]
        settings = apply(RecoverySettings.stored(item.recovery), change, disks)
        item.recovery, item.updated = settings.changed(), now
        await s.commit()
        doc = item_doc(item, await s.get(db.Policy, item.policy), now)
    log.info("recovery_settings_changed", machine=name, settings=sorted(change))
    return doc
