"""CLI verbs: ``plan create|list|show|update|delete|test-failover|cleanup|failover|commit|
reprotect|failback`` (REST ``/api/v1/plans``) and ``jobs resume JOB`` (confirm the manual
action a job waits at).

A plan's groups come from ``--group ITEM,ITEM`` (repeated, in order) with per-group
``--pre-script N=PATH`` ``--post-script N=PATH`` ``--pre-action N=TEXT``
``--post-action N=TEXT`` (N: the group's number, from 1), or from ``--file FILE`` (a JSON
document ``{"description": ..., "groups": [...]}`` as the REST API takes it). The plan
verbs queue one job for the whole plan; ``--wait`` follows it to the end (exit 1 if it
failed), printing each step as it changes — a manual action shows what to do and the
``jobs resume`` command that confirms it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from siterecovery.apiopts import add_api_args, call, call_and_show
from siterecovery.argtypes import wait_seconds
from siterecovery.errors import UsageError
from siterecovery.jobfollow import describe_job, start_and_follow
from siterecovery.output import show, table
from siterecovery.recoveryopts import back_args, back_body

PLAN_COLUMNS = [("name", "NAME"), ("groups_n", "GROUPS"), ("items", "ITEMS"),
                ("last", "LAST JOB"), ("description", "DESCRIPTION")]


def describe_plan(p: dict[str, Any]) -> str:
    last = p["last_job"]
    lines = [f"plan:        {p['name']}",
             f"description: {p['description'] or '-'}",
             f"items:       {p['items']}",
             f"last job:    {last['kind']} {last['state']} ({last['id']})" if last else
             "last job:    -", f"job target:  {p['job_target']}"]
    for n, g in enumerate(p["groups"], 1):
        lines.append(f"group {n} ({g['name']}): {', '.join(g['items'])}")
        for phase in ("pre", "post"):
            s = g[f"{phase}_script"]
            if s:
                lines.append(f"  {phase} script: {' '.join([s['path'], *s['args']])} "
                             f"(timeout {s['timeout_seconds']} s)")
            if g[f"{phase}_action"]:
                lines.append(f"  {phase} manual action: {g[phase + '_action']}")
    return "\n".join(lines)


def _numbered(values: list[str] | None, option: str, groups: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for v in values or []:
        n, sep, rest = v.partition("=")
        if not sep or not n.isdigit() or not 1 <= int(n) <= groups or not rest:
            raise UsageError(f"{option} {v!r}: give N=VALUE with N a group number from 1 to "
                           f"{groups} (the order of --group)")
        out[int(n)] = rest
    return out


def _groups(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The groups the options give (None: none given)."""
    if args.file:
        try:
            doc = json.loads(Path(args.file).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the plan file {args.file}: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
            raise UsageError(f"{args.file}: a JSON object with a list 'groups' is expected")
        groups: list[dict[str, Any]] = doc["groups"]
        if args.description is None and isinstance(doc.get("description"), str):
            args.description = doc["description"]
        return groups
    if not args.group:
        for opt in ("pre_script", "post_script", "pre_action", "post_action"):
            if getattr(args, opt):
                raise UsageError(f"--{opt.replace('_', '-')} needs the groups: --group ITEMS")
        return None
    out: list[dict[str, Any]] = [{"items": [i.strip() for i in g.split(",") if i.strip()]}
                                 for g in args.group]
    n = len(out)
    for phase in ("pre", "post"):
        for k, path in _numbered(getattr(args, f"{phase}_script"), f"--{phase}-script",
                                 n).items():
            out[k - 1][f"{phase}_script"] = {"path": str(Path(path).absolute()),
                                             "timeout_seconds": args.script_timeout}
        for k, text in _numbered(getattr(args, f"{phase}_action"), f"--{phase}-action",
                                 n).items():
            out[k - 1][f"{phase}_action"] = text
    return out


async def cmd_create(args: argparse.Namespace) -> int:
    groups = _groups(args)
    if groups is None:
        raise UsageError("a plan needs groups: --group ITEM,ITEM (repeated) or --file FILE")
    body: dict[str, Any] = {"name": args.name, "groups": groups}
    if args.description is not None:
        body["description"] = args.description
    return await call_and_show(args, "POST", "/api/v1/plans", describe_plan, body)


async def cmd_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    groups = _groups(args)
    if groups is not None:
        body["groups"] = groups
    if args.description is not None:
        body["description"] = args.description
    if not body:
        raise UsageError("nothing to change: give --group/--file or --description")
    return await call_and_show(args, "PATCH", f"/api/v1/plans/{args.name}", describe_plan,
                               body)


async def cmd_list(args: argparse.Namespace) -> int:
    doc = await call(args, "GET", "/api/v1/plans")
    rows = [{**p, "groups_n": len(p["groups"]),
             "last": f"{p['last_job']['kind']} {p['last_job']['state']}" if p["last_job"]
             else None} for p in doc["plans"]]
    return show(doc, args, table(rows, PLAN_COLUMNS))


async def cmd_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/plans/{args.name}", describe_plan)


async def cmd_delete(args: argparse.Namespace) -> int:
    return await call_and_show(args, "DELETE", f"/api/v1/plans/{args.name}",
                               lambda d: f"plan {d['deleted']} deleted")


async def _start(args: argparse.Namespace, verb: str, body: dict[str, Any]) -> int:
    return await start_and_follow(args, f"/api/v1/plans/{args.name}/{verb}",
                                  f"plan {args.name}", body)


async def cmd_test(args: argparse.Namespace) -> int:
    return await _start(args, "test-failover", {"point": args.point, "at": args.at})


async def cmd_cleanup(args: argparse.Namespace) -> int:
    return await _start(args, "cleanup-test-failover", {"notes": args.notes})


async def cmd_failover(args: argparse.Namespace) -> int:
    return await _start(args, "failover", {"point": args.point, "at": args.at,
                                           "shutdown_source": args.shutdown_source})


async def cmd_commit(args: argparse.Namespace) -> int:
    return await _start(args, "commit", {})


async def cmd_reprotect(args: argparse.Namespace) -> int:
    return await _start(args, "reprotect", back_body("reprotect", args))


async def cmd_failback(args: argparse.Namespace) -> int:
    return await _start(args, "failback", back_body("failback", args))


REPROTECT_HELP = ("replicate every recovered machine into the vault (a delta on its "
                  "failover point or its last re-protect)")
FAILBACK_HELP = ("fail every item back onto its original machine (not cancellable): each "
                 "agent writes only the blocks that differ")


async def cmd_resume(args: argparse.Namespace) -> int:
    body = {"notes": args.notes} if args.notes else {}
    return await call_and_show(args, "POST", f"/api/v1/jobs/{args.id}/resume", describe_job,
                               body)


def _group_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", action="append", metavar="ITEM,ITEM",
                   help="a group of replicated items recovered in parallel (repeat: groups "
                        "run in the order given)")
    p.add_argument("--file", help="the groups (and description) as a JSON document "
                                  '{"groups": [{"items": [...], "pre_script": {"path": ...},'
                                  ' "post_action": "..."}]}')
    p.add_argument("--description")
    for phase, when in (("pre", "before"), ("post", "after")):
        p.add_argument(f"--{phase}-script", action="append", metavar="N=PATH",
                       help=f"run PATH on the configuration server {when} group N's items "
                            "(repeatable)")
        p.add_argument(f"--{phase}-action", action="append", metavar="N=TEXT",
                       help=f"a manual action {when} group N's items: the job waits until "
                            "'siterecovery jobs resume JOB'")
    p.add_argument("--script-timeout", type=int, default=600, metavar="SECONDS",
                   help="kill a script after this long (default: %(default)s)")


def _point_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--point", help="for every item: latest-processed (default), latest, "
                                   "latest-app-consistent, latest-crash-consistent")
    p.add_argument("--at", metavar="TIME",
                   help="for every item, its newest point created at or before TIME")


def register_under(jsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``resume`` to the ``jobs`` command's subcommands."""
    r = jsub.add_parser("resume", help="confirm the manual action a job waits at",
                        description="A plan job waiting at a manual action goes on.")
    r.add_argument("id")
    r.add_argument("--notes", help="what was done (kept on the job's step)")
    r.set_defaults(func=cmd_resume)
    add_api_args(r)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plan`` to the top-level subparsers."""
    p = sub.add_parser("plan", help="recovery plans: ordered groups of items recovered "
                                    "together, with scripts and manual actions",
                       description="A recovery plan drills, fails over, cleans up, "
                                   "commits, re-protects and fails back its items as one "
                                   "job: groups in order (failback too: the application's "
                                   "start order), the items of a group in parallel, each "
                                   "as its own item job; the job stops at the first item "
                                   "that fails, and run again passes by the items done.")
    psub = p.add_subparsers(dest="plan_cmd", required=True, metavar="VERB")
    verbs: list[argparse.ArgumentParser] = []
    c = psub.add_parser("create", help="create a plan")
    c.add_argument("name")
    _group_args(c)
    c.set_defaults(func=cmd_create)
    u = psub.add_parser("update", help="change a plan's groups or description")
    u.add_argument("name")
    _group_args(u)
    u.set_defaults(func=cmd_update)
    ls = psub.add_parser("list", help="list plans")
    ls.set_defaults(func=cmd_list)
    verbs += [c, u, ls]
    for name, func, help_ in (("show", cmd_show, "show a plan"),
                              ("delete", cmd_delete, "delete a plan (its items stay)")):
        v = psub.add_parser(name, help=help_)
        v.add_argument("name")
        v.set_defaults(func=func)
        verbs.append(v)
    for name, func, help_, extra in (
            ("test-failover", cmd_test, "drill every item of the plan", _point_args),
            ("cleanup", cmd_cleanup, "clean up the plan's drill (notes required)", None),
            ("failover", cmd_failover, "fail every item of the plan over (not "
                                       "cancellable)", _point_args),
            ("commit", cmd_commit, "commit the plan's failover", None),
            ("reprotect", cmd_reprotect, REPROTECT_HELP,
             lambda v: back_args(v, "reprotect")),
            ("failback", cmd_failback, FAILBACK_HELP, lambda v: back_args(v, "failback"))):
        v = psub.add_parser(name, help=help_)
        v.add_argument("name")
        if extra is not None:
            extra(v)
        v.add_argument("--wait", action="store_true", help="follow the job to its end")
        v.add_argument("--timeout", type=wait_seconds, metavar="SECONDS",
                       help="stop waiting after this long (the job goes on)")
        v.set_defaults(func=func)
        verbs.append(v)
    verbs[-5].add_argument("--notes", required=True, help="what the drill showed")
    verbs[-4].add_argument("--shutdown-source", action="store_true",
                           help="ask each source's agent for a last cycle and a shutdown "
                                "first")
    for v in verbs:
        add_api_args(v)
