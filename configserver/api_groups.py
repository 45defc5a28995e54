"""Routes: multi-VM consistency groups (create, list, show, change, add and remove members,
delete), their recovery as one job (test failover, cleanup, failover, commit to a group
point; re-protect and failback of every member), their group points, and the process
servers' reports of group points. The rules are in ``configserver/groups.py``,
``configserver/grouppoints.py`` and ``configserver/groupops.py``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from configserver import groupops, grouppoints, groups
from configserver.api_failover import REPROTECT_REFUSALS
from configserver.api_plans import item_body
from configserver.jobs import JOB, job_doc
from configserver.rest import NAME, Call, Handler, Route, array, nullable, obj, reply

_NAME = {"name": NAME}
_GROUP_POINT_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
DELETED = obj({"deleted": {"type": "string"}}, ["deleted"])
_GP = {**_GROUP_POINT_ID, "description": "the group point (default: the newest complete one)"}
_NETWORK = {**NAME, "description": "the target network (default: the item's settings)"}
JOB_REPLY = obj({"job": JOB, "group_point": nullable({"type": "string"})},
                ["job", "group_point"])


async def create_group(call: Call) -> web.Response:
    doc = await groups.create(call.services, call.body)
    await call.services.notify()
    return reply(doc, status=201)


async def list_groups(call: Call) -> web.Response:
    return reply({"groups": await groups.list_all(call.services)})


async def show_group(call: Call) -> web.Response:
    return reply(await groups.get(call.services, call.params["name"]))


async def update_group(call: Call) -> web.Response:
    doc = await groups.update(call.services, call.params["name"], call.body)
    await call.services.notify()
    return reply(doc)


async def add_members(call: Call) -> web.Response:
    doc = await groups.add(call.services, call.params["name"],
                           [str(m) for m in call.body["machines"]])
    await call.services.notify()
    return reply(doc)


async def remove_member(call: Call) -> web.Response:
    doc = await groups.remove(call.services, call.params["name"], call.params["machine"])
    await call.services.notify()
    return reply(doc)


async def delete_group(call: Call) -> web.Response:
    await groups.remove_group(call.services, call.params["name"])
    await call.services.notify()
    return reply({"deleted": call.params["name"]})


async def list_group_points(call: Call) -> web.Response:
    return reply({"points": await grouppoints.list_points(call.services, call.params["name"])})


async def show_group_point(call: Call) -> web.Response:
    return reply(await grouppoints.get(call.services, call.params["name"], call.params["id"]))


async def report_group_point(call: Call) -> web.Response:
    await grouppoints.record(call.services, call.body)
    await call.services.notify()
    return reply({"id": call.body["id"]}, status=201)


def _starter(verb: str) -> Handler:
    async def start(call: Call) -> web.Response:
        job, gp = await groupops.request(call.services, call.services.jobs.kinds, verb,
                                         call.params["name"], call.body or {})
        await call.services.notify()
        return reply({"job": job_doc(job, call.services.jobs.kinds), "group_point": gp},
                     status=202)
    start.__name__ = "group_" + verb.replace("-", "_")  # the OpenAPI operationId
    return start


def _verb(verb: str, summary: str, body: dict[str, Any], description: str) -> Route:
    return Route("POST", f"/api/v1/groups/{{name}}/{verb}", _starter(verb), summary, "groups",
                 params=_NAME, body=body, responses={202: JOB_REPLY},
                 refusals=REPROTECT_REFUSALS if verb == "reprotect" else (),
                 description=description + " One job (a plan job of one group) with a step "
                 "per member, the members in parallel, each as its own item job. 404 for a "
                 "group that does not exist; 409 (plan_not_allowed) naming each member whose "
                 "state does not allow it or whose job runs, (plan_job_running) while a job "
                 "of the group runs, or (no_group_point, group_point_not_complete) without a "
                 "complete group point (test failover and failover).")


ROUTES = [
    Route("POST", "/api/v1/groups", create_group, "Create a consistency group", "groups",
          body=groups.CREATE, responses={201: groups.GROUP}, refusals=groups.REFUSALS,
          description="Machines whose points are taken at one coordinated moment (the "
                      "process server's barrier). Every member must be assigned to the same "
                      "process server. 409 group_exists for a name taken."),
    Route("GET", "/api/v1/groups", list_groups, "List consistency groups", "groups",
          responses={200: obj({"groups": array(groups.GROUP)}, ["groups"])}),
    Route("GET", "/api/v1/groups/{name}", show_group, "Show a consistency group", "groups",
          params=_NAME, responses={200: groups.GROUP}),
    Route("PATCH", "/api/v1/groups/{name}", update_group,
          "Change a consistency group's interval or barrier timeout", "groups",
          params=_NAME, body=groups.UPDATE, responses={200: groups.GROUP}),
    Route("POST", "/api/v1/groups/{name}/members", add_members,
          "Add machines to a consistency group", "groups", params=_NAME,
          body=groups.MEMBERS_BODY, responses={200: groups.GROUP}, refusals=groups.REFUSALS,
          description="Machines already in the group are left as they are. 409 "
                      "group_job_running while a job of the group is queued or running."),
    Route("DELETE", "/api/v1/groups/{name}/members/{machine}", remove_member,
          "Remove a machine from a consistency group", "groups",
          params={"name": NAME, "machine": NAME}, responses={200: groups.GROUP},
          description="404 group_member_not_found for a machine not in the group; 409 "
                      "group_job_running while a job of the group is queued or running."),
    Route("DELETE", "/api/v1/groups/{name}", delete_group, "Delete a consistency group",
          "groups", params=_NAME, responses={200: DELETED},
          description="Its group points go from the catalog; the members' own recovery "
                      "points stay. 409 group_job_running while a job of the group is "
                      "queued or running."),
    Route("GET", "/api/v1/groups/{name}/points", list_group_points,
          "List a consistency group's group points", "groups", params=_NAME,
          responses={200: obj({"points": array(grouppoints.GROUP_POINT)}, ["points"])},
          description="Oldest first; each with its members' cycles and points (complete: "
                      "every member's point is in the catalog)."),
    Route("GET", "/api/v1/groups/{name}/points/{id}", show_group_point,
          "Show one group point", "groups", params={"name": NAME, "id": _GROUP_POINT_ID},
          responses={200: grouppoints.GROUP_POINT}),
    _verb("test-failover", "Test failover (a drill) of a group to a group point",
          obj({"group_point": _GP, "network": _NETWORK}),
          "Queues Plan test failover: each member's Test failover to its own point of the "
          "group point."),
    _verb("cleanup-test-failover", "Clean up the test failover of a group",
          obj({"notes": {"type": "string", "maxLength": 4000, "pattern": "\\S"}},
              ["notes"]),
          "Queues Plan cleanup test failover: each member's Cleanup test failover."),
    _verb("failover", "Fail a group over to a group point",
          obj({"group_point": _GP, "network": _NETWORK}),
          "Queues Plan failover (not cancellable): each member's Failover to its own point "
          "of the group point."),
    _verb("commit", "Commit the failover of a group", obj({}),
          "Queues Plan commit (not cancellable): each member's Commit."),
    _verb("reprotect", "Re-protect every member of a group", item_body("reprotect"),
          "Queues Plan re-protect: each member's Re-protect with these options (its "
          "recovered machine's disks into the vault, a delta); a member re-protected "
          "already takes its next delta."),
    _verb("failback", "Fail every member of a group back onto its original machine",
          item_body("failback"),
          "Queues Plan failback (not cancellable): each member's Failback with these "
          "options, all members together; each ends protected, direction forward. Run "
          "again after one failed, it passes by the members failed back already; a "
          "member protected that was never failed over is refused."),
    Route("POST", "/api/v1/internal/group-points", report_group_point,
          "Record a group point (process servers)", "groups", auth="internal",
          listeners=("admin", "site"), body=grouppoints.REPORT,
          responses={201: obj({"id": {"type": "string"}}, ["id"])},
          description="A released or failed barrier of a consistency group; a failed one "
                      "raises the event group_point_failed. A repeated report changes "
                      "nothing."),
]
