"""Routes: recovery settings of an item and the failover verbs, which start jobs (the
checks are in ``configserver/failoverops.py``, the steps in ``configserver/failover.py``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from configserver import failoverops
from configserver.items import ITEM
from configserver.jobs import JOB, job_doc
from configserver.recovery import RECOVERY_CHANGE
from configserver.rest import NAME, Call, Handler, Route, obj, reply

JOB_REPLY = obj({"job": JOB}, ["job"])
_MACHINE = {"machine": NAME}
_POINT = {"type": "string", "minLength": 1, "maxLength": 64,
          "description": "latest-processed (default), latest, latest-app-consistent, "
                         "latest-crash-consistent, or a point id (or a prefix of one)"}
_AT = {"type": "string", "maxLength": 40, "format": "date-time",
       "description": "only points created at or before this time (RFC 3339; other ISO 8601 "
                      "forms, such as a date alone, are accepted too; 422 invalid_time)"}
_NOTES = {"type": "string", "maxLength": 4000}
_DRAIN = {"type": "integer", "minimum": 1, "maximum": 86400, "description": (
    "with the point 'latest': how long to wait for the process server to upload what it "
    "acknowledged (default: the server's failover_drain_timeout_seconds)")}
_INSTANT = {
    "instant": {"type": "boolean", "description": (
        "instant recovery: the machine boots on its disks served over NBD straight from "
        "the vault, then moves onto local copies without a reboot once they are hydrated "
        "(libvirt target only; others: 422 instant_not_supported)")},
    "hydrate_rate_mbps": {"type": "number", "minimum": 0, "maximum": 100000, "description": (
        "with instant: the rate of the background copy from the vault in Mbit/s (0 or "
        "absent: unlimited); the guest's own reads are not limited")}}
RECOVER_BODY = obj({"point": _POINT, "at": _AT, "network": NAME,
                    "drain_timeout_seconds": _DRAIN})
DRILL_BODY = obj({"point": _POINT, "at": _AT, "network": NAME,
                  "drain_timeout_seconds": _DRAIN, **_INSTANT})
FAILOVER_BODY = obj({"point": _POINT, "at": _AT, "network": NAME,
                     "drain_timeout_seconds": _DRAIN, **_INSTANT,
                     "shutdown_source": {"type": "boolean", "description": (
                         "ask the source's agent for a last delta cycle and a shutdown "
                         "first; the failover goes on if it does not answer")},
                     "shutdown_timeout_seconds": {
                         "type": "integer", "minimum": 1, "maximum": 86400, "description": (
                             "how long to wait for the agent's answer (default: the "
                             "server's failover_shutdown_timeout_seconds)")}})
CLEANUP_BODY = obj({"notes": _NOTES}, ["notes"])


async def update_recovery(call: Call) -> web.Response:
    doc = await failoverops.update_settings(call.services, call.params["machine"], call.body)
    await call.services.notify()
    return reply(doc)


def _starter(verb: str) -> Handler:
    async def start(call: Call) -> web.Response:
        job = await failoverops.request(call.services, call.services.jobs.kinds, verb,
                                        call.params["machine"], call.body or {})
        await call.services.notify()
        return reply({"job": job_doc(job, call.services.jobs.kinds)}, status=202)
    start.__name__ = verb.replace("-", "_")  # the OpenAPI operationId
    return start


# what a re-protect refuses beyond its body's schema (item, plan and group routes)
REPROTECT_REFUSALS = ("pause and live together: two ways of reading a running recovered "
                      "machine (conflicting_options)",)


def _verb(verb: str, summary: str, body: dict[str, Any], description: str,
          rules: dict[str, Any] | None = None, refusals: tuple[str, ...] = ()) -> Route:
    return Route("POST", f"/api/v1/items/{{machine}}/{verb}", _starter(verb), summary,
                 "failover", params=_MACHINE, body=body, responses={202: JOB_REPLY},
                 rules=rules, refusals=refusals,
                 description=description + " 404 for an item that does not exist; 409 when "
                 "its state does not allow it or a job of it is running.")


ROUTES = [
    Route("PATCH", "/api/v1/items/{machine}/recovery", update_recovery,
          "Change a replicated item's recovery settings", "failover", params=_MACHINE,
          body=RECOVERY_CHANGE, responses={200: ITEM},
          description="Sets any of the recovery settings (compute and network); null sets "
                      "one back to its default. 422 names the setting refused and the values "
                      "allowed; 409 while a recovery of the item runs."),
    _verb("test-failover", "Test failover (a drill) of a replicated item", DRILL_BODY,
          "Queues Test failover: the point's disks are restored from the vault, checked and "
          "created on the item's target on its drill network, booted where the target can; "
          "the drill's proof (point, checks, boot, RTO) goes on the job and the item. "
          "Replication goes on."),
    _verb("cleanup-test-failover", "Clean up a test failover", CLEANUP_BODY,
          "Queues Cleanup test failover: removes everything the drill created and keeps the "
          "operator's notes on the item (notes that are only blanks: 422 notes_required).",
          rules={"properties": {"notes": {"pattern": "\\S"}}}),
    _verb("failover", "Fail a replicated item over", FAILOVER_BODY,
          "Queues Failover (not cancellable): replication stops, the point is restored, "
          "checked, created on the target and booted; the item ends failed_over."),
    _verb("change-recovery-point", "Change the recovery point of a failed-over item",
          RECOVER_BODY, "Queues Change recovery point (before commit): the machine made "
          "from the previous point is removed and the new point's is created and booted."),
    _verb("failback", "Fail a failed-over item back onto its original machine",
          obj({"timeout_seconds": {"type": "integer", "minimum": 1, "maximum": 86400 * 7,
                                   "description": "how long to wait for the original "
                                                  "machine's agent (default 6 hours)"},
              "shutdown_timeout_seconds": {
                  "type": "integer", "minimum": 1, "maximum": 86400, "description": (
                      "a recovered libvirt domain still running is asked to shut down "
                      "(virsh shutdown); how long to wait for it to be shut off (default: "
                      "the server's failover_shutdown_timeout_seconds)")}}),
          "Queues Failback (not cancellable; from failed_over or committed): the recovered "
          "machine is shut down (a libvirt domain; the folder target's is not running), its "
          "disks are taken into the vault as a point, the original machine's "
          "agent writes onto its disks only the blocks that differ and verifies them, the "
          "recovered machine is removed; the item ends protected, replicating again as a "
          "delta on that point."),
    _verb("reprotect", "Re-protect a failed-over item (the recovered machine into the vault)",
          obj({"pause": {"type": "boolean", "description": (
              "a recovered libvirt domain that runs is read paused (its guest stands "
              "still for the read: a crash-consistent point) instead of refused")},
               "live": {"type": "boolean", "description": (
              "a recovered libvirt domain that runs is copied at one moment while it "
              "runs on (a libvirt push backup into its pool folder, then read and "
              "removed: a crash-consistent point, the guest never paused) instead of "
              "refused; not with pause")},
               "agent": {"type": "boolean", "description": (
              "the Mobility agent inside the recovered machine replicates it (on any "
              "target, continuously until a failback): its first cycle a resync on the "
              "point the machine started from; the job ends at its first point; not with "
              "pause or live")},
               "wait_seconds": {"type": "integer", "minimum": 1, "maximum": 86400 * 7,
                                "description": "with agent: how long to wait for the "
                                               "agent's first point (default 24 hours)"}}),
          "Queues Re-protect (from failed_over, committed or reprotected): the "
          "recovered machine's disks, read on the host from the target (a libvirt domain "
          "while shut off, paused with pause, or copied while it runs with live: else a "
          "running one fails the job), go "
          "into the vault "
          "as a point of the item, a delta on the failover point (or the last re-protect's); "
          "with agent the agent in the recovered machine replicates it instead; "
          "the item ends reprotected, direction reverse.", refusals=REPROTECT_REFUSALS),
    _verb("commit", "Commit a failover", obj({}),
          "Queues Commit: the item's remaining recovery points are deleted from the vault "
          "and the catalog; the item ends committed."),
]
