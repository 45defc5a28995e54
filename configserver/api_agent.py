"""Routes: what a protected machine's Mobility agent calls on the site listener.

Authenticated by the machine's client certificate (``auth="agent"``): ``call.peer``
is the machine name ``configserver/peer.py`` verified, so an agent only ever
reads and writes its own machine. Every call counts as a check-in
(``last_contact``), which is what Enable protection waits for.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession

from common.names import DISK_PATTERN
from configserver import certs, db, groups, hostroles, sendlimit
from configserver.agentwatch import (
    MAX_WAIT_SECONDS,
    digest,
    failback_request,
    shutdown_request,
)
from configserver.hostroles import note_recovered
from configserver.items import (
    ITEM,
    PERCENT,
    REPLICATING_STATES,
    ItemState,
    apply_progress,
    item_doc,
)
from configserver.rest import ApiError, Call, Route, array, iso, nullable, obj, reply

log = structlog.get_logger("configserver.agent")

HEARTBEAT_INTERVAL_SECONDS = 60
DISK_NAME = {"type": "string", "pattern": DISK_PATTERN}

SETTINGS = obj({
    "machine": {"type": "string"},
    "replicate": {"type": "boolean", "description": "whether the agent should replicate now"},
    "item_state": nullable({"type": "string"}),
    "resync_required": {"type": "boolean"},
    "disks": {"type": "array", "items": obj(
        {"name": {"type": "string"}, "path": {"type": "string"},
         "size_bytes": nullable({"type": "integer"})}, ["name", "path", "size_bytes"])},
    "process_server": nullable(obj({"name": {"type": "string"},
                                    "address": {"type": "string"}}, ["name", "address"])),
    "policy": nullable(obj({
        "name": {"type": "string"}, "crash_consistent_interval_seconds": {"type": "integer"},
        "app_consistent_frequency_seconds": {"type": "integer"},
        "block_size": {"type": "integer"}, "rpo_threshold_seconds": {"type": "integer"}},
        ["name", "crash_consistent_interval_seconds", "app_consistent_frequency_seconds",
         "block_size", "rpo_threshold_seconds"])),
    "bandwidth": {**sendlimit.SHOWN, "description": (
        "the policy's send limit, which overrides the agent's own mobility.toml limits; "
        "null: the policy has none, the agent's own apply")},
    "revoked_server_certificates": {**array(certs.SERIAL), "description": (
        "serials (lowercase hex) of revoked process-server and site-listener certificates "
        "not yet expired: the agent refuses a server presenting one")},
    "server_revocation_list": nullable({"type": "string", "description": (
        "the same serials as a CRL (PEM) signed by the CA, which the agent's TLS "
        "contexts check at the handshake; null when none is revoked")}),
    "heartbeat_interval_seconds": {"type": "integer"},
    "shutdown_request": nullable({"type": "string", "description": (
        "a failover asks the agent to take a last delta cycle, report it with POST "
        "/api/v1/agent/shutdown carrying this id, and shut the machine down")}),
    "failback_request": nullable({**obj({"request": {"type": "string"},
                                         "point": {"type": "string"}}, ["request", "point"]),
                                  "description": (
        "a failback asks the agent to write this point onto its disks (only the blocks "
        "that differ) and answer with POST /api/v1/agent/failback carrying this id")}),
    "group": nullable({**obj({"name": {"type": "string"}, "members": array({"type": "string"}),
                              "interval_seconds": {"type": "integer"},
                              "barrier_timeout_seconds": {"type": "integer"}},
                             ["name", "members", "interval_seconds",
                              "barrier_timeout_seconds"]), "description": (
        "the machine's consistency group: every interval_seconds (counted from the UNIX "
        "epoch) its members meet at their process server's barrier for a group point")}),
    "role": {"enum": ["original", "recovered"], "description": (
        "recovered: the agent runs in the machine a failover recovered (it reported another "
        "host_id than the machine's); it replicates only when re-protected through its "
        "agent, and gets no shutdown, failback or group requests")},
    "basis_point": nullable({"type": "string", "description": (
        "the recovered machine re-protected through its agent: the point a cycle without "
        "the agent's own maps compares the disks with (a resync by basis)")}),
    "digest": {"type": "string", "description": (
        "a hash of what the agent acts on at once (the item's state, a failover's shutdown "
        "and a failback's request): the since of GET /api/v1/agent/settings/changes")},
}, ["machine", "replicate", "item_state", "resync_required", "disks", "process_server",
    "policy", "bandwidth", "revoked_server_certificates", "server_revocation_list",
    "heartbeat_interval_seconds", "role", "basis_point"])
TRACKER = obj({
    "tracker": {"type": "string", "pattern": "^[a-z]{1,16}$"},
    "verified_at": nullable({"type": "number", "minimum": 0, "maximum": 1e11}),
    "missed_blocks": {"type": "integer", "minimum": 0, "maximum": 1 << 40}},
    ["tracker", "verified_at", "missed_blocks"])
HEARTBEAT = obj({
    "agent_version": {"type": "string", "minLength": 1, "maxLength": 40},
    "trackers": {"type": "object", "maxProperties": 64, "propertyNames": DISK_NAME,
                 "additionalProperties": TRACKER, "description": (
                     "per disk: its change tracker, when a cycle last read it whole "
                     "(UNIX seconds) and how many changed blocks the tracker had missed "
                     "at its last verification scan (the tracker_missed_writes alert)")},
    "host_id": hostroles.HOST_ID},
    ["agent_version"])
HEARTBEAT_REPLY = obj({"machine": {"type": "string"}, "last_contact": {"type": "string"},
                       "replicate": {"type": "boolean"}, "item_state": nullable(
                           {"type": "string"})},
                      ["machine", "last_contact", "replicate", "item_state"])
SHUTDOWN = obj({
    "request": {"type": "string", "minLength": 1, "maxLength": 64},
    "cycle": nullable({"type": "string", "maxLength": 64, "description": (
        "the last cycle, acknowledged by the process server (null if it failed)")}),
    "error": nullable({"type": "string", "maxLength": 2000, "description": (
        "why the last cycle or the shutdown failed")}),
    "stage": {"enum": ["shutting_down", "shutdown_failed"], "description": (
        "shutting_down: the last cycle is done and the machine is being shut down; "
        "shutdown_failed: the shutdown command failed (the machine may still run)")},
}, ["request", "cycle", "error", "stage"])
PROGRESS = obj({
    "disks": {"type": "object", "minProperties": 1, "maxProperties": 64,
              "propertyNames": DISK_NAME, "additionalProperties": PERCENT},
    "resync": {"type": "boolean", "description": "true while a resynchronization (a full "
                                                  "cycle after initial replication) runs"},
    "host_id": hostroles.HOST_ID,
}, ["disks"])


async def _machine(s: AsyncSession, name: str) -> db.Machine:
    machine: db.Machine | None = await s.get(db.Machine, name, with_for_update=True)
    if machine is None:  # verify_peer checked it a moment ago; it was removed since
        raise ApiError(401, "unauthorized", f"machine {name!r} is no longer in the inventory")
    return machine


async def settings(call: Call) -> web.Response:
    name, now = str(call.peer), call.services.clock()
    host_id: str | None = call.query.get("host_id")
    async with call.services.sessionmaker() as s:
        machine = await _machine(s, name)
        item = await s.get(db.ReplicatedItem, name, with_for_update=True)
        who = hostroles.role(machine, item, host_id)
        if who == hostroles.RECOVERED:
            assert item is not None
            note_recovered(item, host_id, now)
            reverse = hostroles.reverse(item)
        else:
            machine.last_contact = now
            hostroles.note_original(s, machine, host_id, now)
        policy = await s.get(db.Policy, item.policy) if item is not None else None
        ps = await s.get(db.ProcessServer, machine.process_server) \
            if machine.process_server else None
        disks = [{"name": str(d["name"]), "path": str(d.get("path", "")),
                  "size_bytes": d.get("size_bytes")} for d in machine.disks or []]
        revoked = await certs.revoked_servers(s, call.services.clock())
        group = await groups.group_of(s, name)
        await s.commit()
    await call.services.notify()
    if who == hostroles.RECOVERED:
        assert item is not None
        log.info("recovered_agent_settings", machine=name, host_id=host_id,
                 replicate=reverse is not None)
        # The recovered copy: replicates only when re-protected through its agent, and is
        # never asked for the original's shutdown, failback or group points.
        return reply({**_settings_doc(name, item, policy, ps, disks, revoked, call),
                      "replicate": reverse is not None, "resync_required": False,
                      "role": hostroles.RECOVERED, "basis_point": hostroles.basis_point(item)
                      if reverse is not None else None})
    return reply({**_settings_doc(name, item, policy, ps, disks, revoked, call),
                  "shutdown_request": shutdown_request(item),
                  "failback_request": failback_request(item), "group": group})


def _settings_doc(name: str, item: db.ReplicatedItem | None, policy: db.Policy | None,
                  ps: db.ProcessServer | None, disks: list[dict[str, Any]],
                  revoked: list[tuple[str, Any]], call: Call) -> dict[str, Any]:
    return {
        "machine": name,
        "replicate": item is not None and item.state in REPLICATING_STATES,
        "item_state": item.state if item is not None else None,
        "resync_required": item is not None and item.state == "resync_required",
        "disks": disks,
        "process_server": {"name": ps.name, "address": ps.address} if ps else None,
        "policy": None if policy is None else {
            "name": policy.name,
            "crash_consistent_interval_seconds": policy.crash_consistent_interval_s,
            "app_consistent_frequency_seconds": policy.app_consistent_frequency_s,
            "block_size": policy.block_size, "rpo_threshold_seconds": policy.rpo_threshold_s},
        "bandwidth": None if policy is None else policy.send_limit,
        "revoked_server_certificates": [serial for serial, _ in revoked],
        "server_revocation_list": call.services.ca.revocation_list(
            revoked, call.services.clock()).decode() if revoked else None,
        "heartbeat_interval_seconds": HEARTBEAT_INTERVAL_SECONDS,
        "shutdown_request": None, "failback_request": None, "group": None,
        "role": hostroles.ORIGINAL, "basis_point": None, "digest": digest(item),
    }


async def changes(call: Call) -> web.Response:
    """A long poll: the calling agent's digest once it is not ``since``, or after ``wait``
    seconds (configserver/agentwatch.py)."""
    watch = call.services.agent_watch
    now = await watch.wait(call.services, str(call.peer), str(call.query.get("since", "")),
                           float(call.query.get("wait", 0)))
    return reply({"digest": now})


async def shutdown(call: Call) -> web.Response:
    """The agent's answer to a shutdown request: its last cycle (or why there is none),
    then whether the shutdown command failed. Recorded on the item's failover."""
    name, b = str(call.peer), call.body
    now = call.services.clock()
    async with call.services.sessionmaker() as s:
        machine = await _machine(s, name)
        machine.last_contact = now
        item = await s.get(db.ReplicatedItem, name, with_for_update=True)
        rec = dict(item.failover or {}) if item is not None else {}
        asked = dict(rec.get("shutdown") or {})
        if asked.get("request") != b["request"]:
            raise ApiError(409, "no_shutdown_request", f"no shutdown of {name!r} was "
                           f"requested with id {b['request']!r}",
                           "only a running failover asks for it (its settings' "
                           "shutdown_request)")
        assert item is not None
        if b["stage"] == "shutting_down":
            asked.update(reported=now, cycle=b["cycle"], cycle_error=b["error"])
        else:
            asked.update(shutdown_error=b["error"] or "the shutdown command failed")
        item.failover = {**rec, "shutdown": asked}
        await s.commit()
    log.info("agent_shutdown_reported", machine=name, request=b["request"], stage=b["stage"],
             cycle=b["cycle"], error=b["error"])
    await call.services.notify()
    return reply({"request": b["request"], "recorded": True})


async def heartbeat(call: Call) -> web.Response:
    name = str(call.peer)
    now = call.services.clock()
    host_id: str | None = call.body.get("host_id")
    async with call.services.sessionmaker() as s:
        machine = await _machine(s, name)
        item = await s.get(db.ReplicatedItem, name, with_for_update=True)
        state = item.state if item is not None else None
        if hostroles.role(machine, item, host_id) == hostroles.RECOVERED:
            assert item is not None
            note_recovered(item, host_id, now, call.body["agent_version"])
            replicate = hostroles.reverse(item) is not None
        else:
            machine.last_contact, machine.agent_version = now, call.body["agent_version"]
            if "trackers" in call.body:
                machine.tracker_report = call.body["trackers"]
            hostroles.note_original(s, machine, host_id, now)
            replicate = state in REPLICATING_STATES
        await s.commit()
    call.services.metrics.agent_heartbeats.inc()
    log.info("agent_heartbeat", machine=name, agent_version=call.body["agent_version"],
             host_id=host_id)
    await call.services.notify()
    return reply({"machine": name, "last_contact": iso(now), "replicate": replicate,
                  "item_state": state})


def _resync_event(before: str, after: str) -> tuple[str, str] | None:
    if after == ItemState.RESYNCING and before != ItemState.RESYNCING:
        return "resync_started", "resynchronization started"
    if before == ItemState.RESYNCING and after == ItemState.PROTECTED:
        return "resync_completed", "resynchronization completed: every disk is in sync"
    return None


async def progress(call: Call) -> web.Response:
    name = str(call.peer)
    disks: dict[str, float] = call.body["disks"]
    now = call.services.clock()
    host_id: str | None = call.body.get("host_id")
    async with call.services.sessionmaker() as s:
        machine = await _machine(s, name)
        item = await s.get(db.ReplicatedItem, name, with_for_update=True)
        if item is not None and hostroles.role(machine, item, host_id) == hostroles.RECOVERED:
            # The recovered machine's resync: its item is failed over, not resyncing.
            note_recovered(item, host_id, now, progress=disks)
            await s.commit()
            return reply(item_doc(item, await s.get(db.Policy, item.policy), now))
        if item is None:
            raise ApiError(409, "not_replicated", f"replication of {name!r} is not enabled",
                           f"enable it on the configuration server: siterecovery replication "
                           f"enable {name}")
        known = {str(d["name"]) for d in machine.disks or []}
        unknown = sorted(set(disks) - known) if known else []
        if unknown:
            raise ApiError(422, "unknown_disk", f"machine {name!r} has no disk named "
                           f"{', '.join(unknown)} (it has {', '.join(sorted(known))})",
                           "the agent's disks must match the machine's inventory: "
                           f"siterecovery machine show {name}")
        before = item.state
        apply_progress(item, machine, disks, bool(call.body.get("resync", False)), now)
        machine.last_contact = now
        event = _resync_event(before, item.state)
        if event is not None:
            s.add(db.Event(time=now, severity="info", code=event[0], target=name,
                           message=event[1], active=False))
        await s.commit()
        doc = item_doc(item, await s.get(db.Policy, item.policy), now)
    if doc["state"] != before:
        log.info("item_state_changed", machine=name, state=doc["state"], was=before)
    await call.services.notify()
    return reply(doc)


ROUTES = [
    Route("GET", "/api/v1/agent/settings", settings, "The calling agent's settings", "agent",
          auth="agent", listeners=("site",), responses={200: SETTINGS},
          query={"host_id": hostroles.HOST_ID},
          description="Disks, process server, policy intervals and block size, the "
                      "policy's send limit, revoked server certificates; whether to "
                      "replicate. Counts as a check-in (of the original machine; the "
                      "recovered copy's is kept in the item's failover record)."),
    Route("GET", "/api/v1/agent/settings/changes", changes,
          "Wait for a change the calling agent acts on at once", "agent", auth="agent",
          listeners=("site",), responses={200: obj({"digest": {"type": "string"}},
                                                   ["digest"])},
          query={"since": {"type": "string", "maxLength": 64},
                 "wait": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS}},
          description="A long poll: answers with the machine's digest as soon as it is not "
                      "since (the digest of its last settings; none: at once): "
                      "replication enabled, disabled or to resynchronize, a failover's "
                      "shutdown or a failback's request; else after wait seconds. The agent "
                      "then pulls its settings."),
    Route("POST", "/api/v1/agent/heartbeat", heartbeat, "An agent's heartbeat", "agent",
          auth="agent", listeners=("site",), body=HEARTBEAT, responses={200: HEARTBEAT_REPLY},
          description="Records last contact and the agent's version."),
    Route("POST", "/api/v1/agent/shutdown", shutdown,
          "An agent's answer to a failover's shutdown request", "agent", auth="agent",
          listeners=("site",), body=SHUTDOWN,
          responses={200: obj({"request": {"type": "string"}, "recorded": {"type": "boolean"}},
                              ["request", "recorded"])},
          description="Sent after the last delta cycle (stage shutting_down, with its cycle "
                      "or the error) and again if the shutdown command fails (stage "
                      "shutdown_failed). 409 no_shutdown_request when no running failover "
                      "asked for it."),
    Route("POST", "/api/v1/agent/progress", progress, "An agent's replication progress",
          "agent", auth="agent", listeners=("site",), body=PROGRESS, responses={200: ITEM},
          description="Per-disk percentages of the initial replication (or of a "
                      "resynchronization with resync=true). 409 not_replicated without a "
                      "replicated item; 422 unknown_disk for a disk not in the inventory."),
]
