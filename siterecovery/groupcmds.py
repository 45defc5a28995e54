"""CLI verbs: ``group create|add|remove|show|list|delete|update|points`` and ``group
test-failover|cleanup|failover|commit|reprotect|failback`` (REST ``/api/v1/groups``):
multi-VM consistency groups, whose members' points are taken at one coordinated moment,
the group points that moment made, the recovery of every member to one group point in
one job, and the way back (re-protect, failback) of every member in one job."""

from __future__ import annotations

import argparse
from typing import Any

from siterecovery.apiopts import add_api_args, call, call_and_show
from siterecovery.argtypes import seconds, wait_seconds
from siterecovery.errors import UsageError
from siterecovery.jobfollow import start_and_follow
from siterecovery.output import show, table
from siterecovery.recoveryopts import back_args, back_body

GROUP_COLUMNS = [("name", "NAME"), ("members_s", "MEMBERS"), ("process_server", "PROCESS SERVER"),
                 ("interval_seconds", "INTERVAL S"), ("barrier_timeout_seconds", "TIMEOUT S"),
                 ("last", "LAST GROUP POINT")]
POINT_COLUMNS = [("id", "GROUP POINT"), ("created", "CREATED"), ("state", "STATE"),
                 ("members_s", "MEMBER POINTS"), ("error", "ERROR")]


def describe_group(g: dict[str, Any]) -> str:
    last, job = g["last_point"], g["last_job"]
    return "\n".join([
        f"group:            {g['name']}",
        f"members:          {', '.join(g['members']) or '-'}",
        f"process server:   {g['process_server'] or '-'}",
        f"interval:         {g['interval_seconds']} s",
        f"barrier timeout:  {g['barrier_timeout_seconds']} s",
        f"last group point: {last['id']} {last['state']} at {last['created']}" if last
        else "last group point: -",
        f"last job:         {job['kind']} {job['state']} ({job['id']})" if job
        else "last job:         -"])


def describe_point(p: dict[str, Any]) -> str:
    lines = [f"group point: {p['id']} ({p['group']})", f"created:     {p['created']}",
             f"state:       {p['state']}"]
    if p["error"]:
        lines.append(f"error:       {p['error']}")
    lines += [f"  {m['machine']}: point {m['point'] or '-'} (cycle {m['cycle'] or '-'})"
              for m in p["members"]]
    return "\n".join(lines)


async def cmd_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "members": args.machines}
    if args.interval is not None:
        body["interval_seconds"] = args.interval
    if args.barrier_timeout is not None:
        body["barrier_timeout_seconds"] = args.barrier_timeout
    return await call_and_show(args, "POST", "/api/v1/groups", describe_group, body)


async def cmd_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.interval is not None:
        body["interval_seconds"] = args.interval
    if args.barrier_timeout is not None:
        body["barrier_timeout_seconds"] = args.barrier_timeout
    if not body:
        raise UsageError("nothing to change: give --interval or --barrier-timeout")
    return await call_and_show(args, "PATCH", f"/api/v1/groups/{args.name}", describe_group,
                               body)


async def cmd_add(args: argparse.Namespace) -> int:
    return await call_and_show(args, "POST", f"/api/v1/groups/{args.name}/members",
                               describe_group, {"machines": args.machines})


async def cmd_remove(args: argparse.Namespace) -> int:
    return await call_and_show(args, "DELETE",
                               f"/api/v1/groups/{args.name}/members/{args.machine}",
                               describe_group)


async def cmd_list(args: argparse.Namespace) -> int:
    doc = await call(args, "GET", "/api/v1/groups")
    rows = [{**g, "members_s": ", ".join(g["members"]),
             "last": f"{g['last_point']['state']} {g['last_point']['created']}"
             if g["last_point"] else None} for g in doc["groups"]]
    return show(doc, args, table(rows, GROUP_COLUMNS))


async def cmd_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/groups/{args.name}", describe_group)


async def cmd_delete(args: argparse.Namespace) -> int:
    return await call_and_show(args, "DELETE", f"/api/v1/groups/{args.name}",
                               lambda d: f"group {d['deleted']} deleted (the members' own "
                                         "points stay)")


async def cmd_points(args: argparse.Namespace) -> int:
    doc = await call(args, "GET", f"/api/v1/groups/{args.name}/points")
    rows = [{**p, "members_s": ", ".join(f"{m['machine']}={(m['point'] or '-')[:12]}"
                                         for m in p["members"])} for p in doc["points"]]
    return show(doc, args, table(rows, POINT_COLUMNS))


async def _start(args: argparse.Namespace, verb: str, body: dict[str, Any]) -> int:
    return await start_and_follow(args, f"/api/v1/groups/{args.name}/{verb}",
                                  f"group {args.name}", body)


async def cmd_test(args: argparse.Namespace) -> int:
    return await _start(args, "test-failover", {"group_point": args.group_point,
                                                "network": args.network})


async def cmd_cleanup(args: argparse.Namespace) -> int:
    return await _start(args, "cleanup-test-failover", {"notes": args.notes})


async def cmd_failover(args: argparse.Namespace) -> int:
    return await _start(args, "failover", {"group_point": args.group_point,
                                           "network": args.network})


async def cmd_commit(args: argparse.Namespace) -> int:
    return await _start(args, "commit", {})


async def cmd_reprotect(args: argparse.Namespace) -> int:
    return await _start(args, "reprotect", back_body("reprotect", args))


async def cmd_failback(args: argparse.Namespace) -> int:
    return await _start(args, "failback", back_body("failback", args))


def _timing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=seconds, metavar="SECONDS",
                   help="seconds between group points (default on create: 3600)")
    p.add_argument("--barrier-timeout", type=seconds, metavar="SECONDS",
                   help="how long the process server waits for every member at a group "
                        "point; a member that does not arrive fails it (default on create: "
                        "60)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``group`` to the top-level subparsers."""
    g = sub.add_parser(
        "group", help="multi-VM consistency groups: points of several machines taken at one "
                      "coordinated moment",
        description="The machines of a consistency group freeze together at each group "
                    "point: their process server holds a barrier until every member is "
                    "frozen, then lets them all go, so their points restore to one moment; "
                    "the group drills, fails over and commits to one group point, and "
                    "re-protects and fails back, each as one job. "
                    "All members must be assigned to the same process server; a machine is "
                    "in one group at most.")
    gsub = g.add_subparsers(dest="group_cmd", required=True, metavar="VERB")
    verbs: list[argparse.ArgumentParser] = []
    c = gsub.add_parser("create", help="create a group of machines")
    c.add_argument("name")
    c.add_argument("machines", nargs="+", metavar="MACHINE")
    _timing(c)
    c.set_defaults(func=cmd_create)
    u = gsub.add_parser("update", help="change a group's interval or barrier timeout")
    u.add_argument("name")
    _timing(u)
    u.set_defaults(func=cmd_update)
    a = gsub.add_parser("add", help="add machines to a group")
    a.add_argument("name")
    a.add_argument("machines", nargs="+", metavar="MACHINE")
    a.set_defaults(func=cmd_add)
    r = gsub.add_parser("remove", help="remove a machine from a group")
    r.add_argument("name")
    r.add_argument("machine")
    r.set_defaults(func=cmd_remove)
    ls = gsub.add_parser("list", help="list groups")
    ls.set_defaults(func=cmd_list)
    verbs += [c, u, a, r, ls]
    for name, func, help_ in (
            ("show", cmd_show, "show a group"),
            ("delete", cmd_delete, "delete a group (its members' own points stay)"),
            ("points", cmd_points, "list a group's group points, oldest first")):
        v = gsub.add_parser(name, help=help_)
        v.add_argument("name")
        v.set_defaults(func=func)
        verbs.append(v)
    for name, func, help_ in (
            ("test-failover", cmd_test, "drill every member at one group point"),
            ("cleanup", cmd_cleanup, "clean up the group's drill (notes required)"),
            ("failover", cmd_failover, "fail every member over to one group point (not "
                                       "cancellable)"),
            ("commit", cmd_commit, "commit the group's failover"),
            ("reprotect", cmd_reprotect, "replicate every member's recovered machine into "
                                         "the vault (each a delta), in one job"),
            ("failback", cmd_failback, "fail every member back onto its original machine, "
                                       "all together in one job (not cancellable): each "
                                       "agent writes only the blocks that differ")):
        v = gsub.add_parser(name, help=help_)
        v.add_argument("name")
        if name in ("test-failover", "failover"):
            v.add_argument("--group-point", metavar="ID",
                           help="the group point (default: the newest complete one; see "
                                "'siterecovery group points NAME')")
            v.add_argument("--network", help="the target network (default: each member's "
                                             "recovery settings)")
        if name == "cleanup":
            v.add_argument("--notes", required=True, help="what the drill showed")
        if name in ("reprotect", "failback"):
            back_args(v, name)
        v.add_argument("--wait", action="store_true", help="follow the job to its end")
        v.add_argument("--timeout", type=wait_seconds, metavar="SECONDS",
                       help="stop waiting after this long (the job goes on)")
        v.set_defaults(func=func)
        verbs.append(v)
    for v in verbs:
        add_api_args(v)
