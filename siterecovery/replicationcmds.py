"""CLI verbs: ``replication enable|disable``, ``items list|show``,
``jobs list|show|wait|cancel``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from siterecovery.apiclient import ApiClient
from siterecovery.apiopts import add_api_args, call_and_show, client
from siterecovery.argtypes import wait_seconds
from siterecovery.errors import EXIT_FAIL, CliError, UsageError
from siterecovery.output import show, table
from siterecovery.recoveryopts import add_settings_args, describe_settings, settings_change

DONE = ("succeeded", "failed", "cancelled")
EXIT_JOB_FAILED = EXIT_FAIL
ITEM_COLUMNS = [("machine", "MACHINE"), ("state", "STATE"), ("health", "HEALTH"),
                ("progress", "PROGRESS"), ("rpo", "RPO"), ("policy", "POLICY"),
                ("latest_point_time", "LATEST POINT")]
JOB_COLUMNS = [("id", "ID"), ("title", "JOB"), ("target", "TARGET"), ("state", "STATE"),
               ("pct", "PROGRESS"), ("created", "CREATED"), ("error", "ERROR")]
STEP_COLUMNS = [("title", "STEP"), ("state", "STATE"), ("pct", "PROGRESS"),
                ("started", "STARTED"), ("ended", "ENDED"), ("message", "MESSAGE")]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _item_row(i: dict[str, Any]) -> dict[str, Any]:
    progress = i["resync_progress"] if i["state"] == "resyncing" else (
        i["initial_progress"] if i["state"] in ("enabling", "initial_replication") else None)
    return {**i, "progress": _pct(progress),
            "rpo": "-" if i["rpo_seconds"] is None else f"{i['rpo_seconds']:.0f}s"}


def describe_item(i: dict[str, Any]) -> str:
    lines = [
        f"machine:            {i['machine']}",
        f"state:              {i['state']} ({i['state_description']})",
        f"health:             {i['health']}",
        *[f"  - {e}" for e in i["health_errors"]],
        f"policy:             {i['policy']}",
        *([f"agent version:      {i['agent']['version'] or '-'}"
           + (f" (older than process server {i['agent']['process_server']}'s "
              f"{i['agent']['process_server_version']})" if i["agent"]["outdated"] else "")]
          if i.get("agent") else []),
        f"initial progress:   {_pct(i['initial_progress'])}",
        *([f"resync progress:    {_pct(i['resync_progress'])}"]
          if i["resync_progress"] is not None else []),
        *[f"  disk {d}: {_pct(p)}" for d, p in sorted(i["disks"].items())],
        "RPO:                " + ("-" if i["rpo_seconds"] is None else
                                  f"{i['rpo_seconds']:.0f} s (threshold "
                                  f"{i['rpo_threshold_seconds']} s)"),
        f"latest point:       {i['latest_point'] or '-'} {i['latest_point_time'] or ''}",
        f"latest app point:   {i['latest_app_point'] or '-'} "
        f"{i['latest_app_point_time'] or ''}",
        f"created:            {i['created']}",
        f"updated:            {i['updated']}",
        *_recovery_lines(i),
    ]
    return "\n".join(line.rstrip() for line in lines)


def _or(v: Any, none: str = "-") -> str:
    return none if v is None or v == [] else ", ".join(v) if isinstance(v, list) else str(v)


def _fsck(checks: Any) -> str:
    """One line per disk of a drill's disk checks: each filesystem and its status."""
    if not isinstance(checks, dict) or not checks:
        return "-"
    out = []
    for disk, c in sorted(checks.items()):
        if not isinstance(c, dict):
            out.append(f"{disk}: {c}")
        elif "checks" in c:
            fs = ", ".join(f"{x['partition']['number']}:{x['fs']} {x['status']}"
                           for x in c["checks"]) or "no filesystem"
            out.append(f"{disk}: {'ok' if c.get('ok') else 'FAILED'} (table {c.get('table')}; "
                       f"{fs})")
        else:
            out.append(f"{disk}: {'ok' if c.get('ok') else 'FAILED'} {c.get('error', '')}")
    return "; ".join(out)


def _boot(boot: Any) -> str:
    if not isinstance(boot, dict):
        return "not booted (the target cannot boot machines)" if boot is None else str(boot)
    if boot.get("booted"):
        return f"booted in {boot.get('seconds', 0):.1f} s ({boot.get('matched')!r})"
    tail = " | ".join((boot.get("console_tail") or [])[-3:])
    return "did not boot" + (f"; console: {tail}" if tail else "")


def _record_lines(title: str, rec: dict[str, Any]) -> list[str]:
    rto = rec.get("rto_seconds")
    return [
        f"{title}:",
        f"  result:           {_or(rec.get('result'))} (job {_or(rec.get('job'))})",
        f"  point:            {_or(rec.get('point'))} {rec.get('point_created') or ''}",
        "  RTO:              " + ("-" if rto is None else f"{rto:.1f} s"),
        f"  started:          {_or(_when(rec.get('started')))}",
        f"  ended:            {_or(_when(rec.get('ended')))}",
        f"  disk checks:      {_fsck(rec.get('checks'))}",
        f"  boot:             {_boot(rec.get('boot'))}" if "boot" in rec else "",
        *([f"  error:            {rec['error']}"] if rec.get("error") else []),
        *([f"  cleanup notes:    {rec['notes']}"] if rec.get("notes") else []),
        *([f"  committed:        {_when(rec['committed'])}"] if rec.get("committed") else []),
    ]


def _when(t: Any) -> str | None:
    """A record's UNIX time as ISO 8601 UTC (records keep the job's own numbers)."""
    if not isinstance(t, (int, float)):
        return None if t is None else str(t)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _recovery_lines(i: dict[str, Any]) -> list[str]:
    """The recovery settings, the last successful drill, the last drill and the failover."""
    r = i.get("recovery") or {}
    lines = [
        "recovery settings:",
        f"  target:           {_or(r.get('target'))}",
        f"  VM name:          {_or(r.get('vm_name'))}",
        f"  CPUs:             {_or(r.get('cpus'))}",
        f"  memory:           {_or(r.get('memory_mib'))} MiB",
        f"  Azure size:       {_or(r.get('azure_size'))}",
        f"  network:          {_or(r.get('network'))} (drills: {_or(r.get('drill_network'))})",
        f"  IP:               {_or(r.get('ip'), 'DHCP')}",
        f"  MAC:              {_or(r.get('mac'))}",
        f"  firmware:         {_or(r.get('firmware'))}",
        f"  disks:            {_or(r.get('disks'), 'every disk')}",
    ]
    good = i.get("last_successful_drill")
    lines.append("last good drill:    " + ("never" if not good else
                 f"{good['time']} ({good['age_days']:.0f} days ago), point {good['point']}, "
                 "RTO " + ("-" if good["rto_seconds"] is None else
                           f"{good['rto_seconds']:.1f} s")))
    if i.get("last_drill"):
        lines += _record_lines("last drill", i["last_drill"])
    if i.get("failover"):
        lines += _record_lines("failover", i["failover"])
    return [line for line in lines if line]


def _job_row(j: dict[str, Any]) -> dict[str, Any]:
    return {**j, "pct": _pct(j["progress"])}


def describe_job(j: dict[str, Any]) -> str:
    head = [
        f"job:       {j['id']}",
        f"kind:      {j['title']} ({j['kind']})",
        f"target:    {j['target']}",
        f"state:     {j['state']} ({_pct(j['progress'])}, attempts {j['attempts']})",
        *([f"error:     {j['error']}"] if j["error"] else []),
        f"created:   {j['created']}",
        f"started:   {j['started'] or '-'}",
        f"ended:     {j['ended'] or '-'}",
        "",
    ]
    steps = table([{**s, "pct": _pct(s["progress"])} for s in j["steps"]], STEP_COLUMNS)
    return "\n".join(head) + steps


def _current(j: dict[str, Any]) -> str:
    running = [s for s in j["steps"] if s["state"] == "running"]
    if not running:
        return ""
    s = running[0]
    return f"  {s['title']} {_pct(s['progress'])}" + (f": {s['message']}" if s["message"]
                                                      else "")


async def wait_for_job(api: ApiClient, jid: str, args: argparse.Namespace,
                       timeout: float | None) -> dict[str, Any]:
    """Follow a job until it ends, printing a line whenever it changes (unless --json)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    doc: dict[str, Any] = await api.get(f"/api/v1/jobs/{jid}")
    shown = ""
    while True:
        line = f"{doc['title']} {doc['target']}: {doc['state']} {_pct(doc['progress'])}" \
               + _current(doc)
        if line != shown and not args.json:
            print(line, flush=True)
            shown = line
        if doc["state"] in DONE:
            return doc
        wait = 30.0
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                raise CliError(f"job {jid} is still {doc['state']} after {timeout:.0f} s "
                               f"(it goes on; follow it: siterecovery jobs wait {jid})")
        doc = await api.get(f"/api/v1/jobs/{jid}", version=doc["version"], wait=f"{wait:.1f}")


def _ended(doc: dict[str, Any], args: argparse.Namespace) -> int:
    """Report how a followed job ended (its document with --json); exit 0 if it
    succeeded, else EXIT_JOB_FAILED."""
    if args.json:
        print(json.dumps(doc))
    if doc["state"] == "succeeded":
        if not args.json:
            print(f"job {doc['id']} succeeded")
        return 0
    if not args.json:
        print(f"job {doc['id']} {doc['state']}: {doc['error']}", file=sys.stderr)
    return EXIT_JOB_FAILED


async def cmd_enable(args: argparse.Namespace) -> int:
    body = {"machine": args.machine, **({"policy": args.policy} if args.policy else {})}
    async with client(args) as api:
        job = (await api.post("/api/v1/replication/enable", body))["job"]
        if not args.wait:
            return show(job, args, f"{job['title']} queued for {args.machine}: job {job['id']}"
                        f"\nfollow it: siterecovery jobs wait {job['id']}")
        done = await wait_for_job(api, job["id"], args, args.timeout)
        if done["state"] == "succeeded":
            fin = (await api.get("/api/v1/jobs", target=args.machine,
                                 kind="finalize_protection", limit=5))["jobs"]
            fin = [j for j in fin if j["params"].get("after") == done["id"]]
            if fin:
                done = await wait_for_job(api, fin[0]["id"], args, args.timeout)
    return _ended(done, args)


async def cmd_disable(args: argparse.Namespace) -> int:
    async with client(args) as api:
        job = (await api.post("/api/v1/replication/disable", {"machine": args.machine}))["job"]
        if not args.wait:
            return show(job, args, f"{job['title']} queued for {args.machine}: job {job['id']}")
        done = await wait_for_job(api, job["id"], args, args.timeout)
    return _ended(done, args)


async def cmd_items_list(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/items", lambda doc: table(
        [_item_row(i) for i in doc["items"]], ITEM_COLUMNS), state=args.state)


async def cmd_items_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/items/{args.machine}", describe_item)


async def cmd_items_update(args: argparse.Namespace) -> int:
    change = settings_change(args)
    if not change:
        raise UsageError("nothing to change: give at least one setting (see --help), or show "
                       f"them with: siterecovery items show {args.machine}")
    return await call_and_show(args, "PATCH", f"/api/v1/items/{args.machine}/recovery",
                               describe_settings, change)


async def cmd_items_resync(args: argparse.Namespace) -> int:
    return await call_and_show(
        args, "POST", f"/api/v1/items/{args.machine}/resync",
        lambda doc: describe_item(doc) + "\nThe agent resynchronizes at its next cycle: "
                                         f"follow it with 'siterecovery items show "
                                         f"{args.machine}'.")


async def cmd_jobs_list(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/jobs", lambda doc: table(
        [_job_row(j) for j in doc["jobs"]], JOB_COLUMNS), target=args.target, kind=args.kind,
        state=args.state, active=True if args.active else None, limit=args.limit)


async def cmd_jobs_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/jobs/{args.id}", describe_job)


async def cmd_jobs_wait(args: argparse.Namespace) -> int:
    async with client(args) as api:
        doc = await wait_for_job(api, args.id, args, args.timeout)
    return _ended(doc, args)


async def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    return await call_and_show(args, "POST", f"/api/v1/jobs/{args.id}/cancel",
                               lambda doc: f"job {doc['id']} {doc['state']}")


def _timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=wait_seconds, metavar="SECONDS",
                   help="give up waiting after this long (the job goes on); default: no limit")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]
             ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add this module's verbs to the top-level subparsers; return the ``jobs`` command's
    subcommands, for the other ``jobs`` verbs."""
    verbs: list[argparse.ArgumentParser] = []
    r = sub.add_parser("replication", help="enable or disable replication of a machine",
                       description="Enabling replication creates the machine's replicated item "
                                   "and starts the Enable protection job: prerequisites check, "
                                   "the Mobility agent checks in, initial replication of every "
                                   "disk until the first recovery point; then Finalize "
                                   "protection marks the item protected.")
    rsub = r.add_subparsers(dest="replication_cmd", required=True, metavar="VERB")
    e = rsub.add_parser("enable", help="start protecting a machine (Enable protection job)",
                        description="Queue Enable protection for MACHINE (it must be in the "
                                    "inventory: siterecovery machine add). With --wait, follow "
                                    "it and Finalize protection to the end; exit 1 if either "
                                    "fails.")
    e.add_argument("machine", help="the machine's inventory name")
    e.add_argument("--policy", help="replication policy (default: 'default')")
    e.add_argument("--wait", action="store_true",
                   help="wait until the machine is protected, printing progress")
    _timeout(e)
    e.set_defaults(func=cmd_enable)
    d = rsub.add_parser("disable", help="stop protecting a machine (Disable protection job)",
                        description="Cancel a running Enable protection, stop replication and "
                                    "remove the replicated item. Recovery points stay in the "
                                    "vault until retention removes them.")
    d.add_argument("machine")
    d.add_argument("--wait", action="store_true", help="wait until the item is removed")
    _timeout(d)
    d.set_defaults(func=cmd_disable)
    verbs += [e, d]

    i = sub.add_parser("items", help="replicated items: state, health, progress, RPO",
                       description="Each protected machine is a replicated item: its state "
                                   "(enabling, initial_replication, protected, resyncing ...), "
                                   "health, current RPO and latest recovery points.")
    isub = i.add_subparsers(dest="items_cmd", required=True, metavar="VERB")
    il = isub.add_parser("list", help="list replicated items")
    il.add_argument("--state", help="only items in this state (e.g. protected)")
    il.set_defaults(func=cmd_items_list)
    ish = isub.add_parser("show", help="show one replicated item")
    ish.add_argument("machine")
    ish.set_defaults(func=cmd_items_show)
    iup = isub.add_parser("update", help="change an item's recovery settings",
                          description="Each option changes one recovery setting (compute and "
                                      "network); --reset NAME sets one back to its default. "
                                      "The same as 'failover settings' with options; the "
                                      "target checks them before every drill and failover.")
    iup.add_argument("machine")
    add_settings_args(iup)
    iup.set_defaults(func=cmd_items_update)
    irs = isub.add_parser(
        "resync", help="resynchronize a protected item against its newest recovery point",
        description="Marks the item resync_required. At its next cycle the agent compares "
                    "every disk, block by block, with the newest recovery point in the vault "
                    "and sends only the blocks that differ (ASR's 'Resynchronize'); the item "
                    "shows resyncing with progress, then protected again.")
    irs.add_argument("machine")
    irs.set_defaults(func=cmd_items_resync)
    verbs += [il, ish, iup, irs]

    j = sub.add_parser("jobs", help="durable jobs and their steps: list, show, wait, cancel",
                       description="Jobs (Enable protection, Finalize protection, Disable "
                                   "protection ...) run step by step on the configuration "
                                   "server and survive its restarts.")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True, metavar="VERB")
    jl = jsub.add_parser("list", help="list jobs, newest first")
    jl.add_argument("--target", help="only jobs of this machine (plan:NAME, group:NAME: of "
                                     "a recovery plan, a consistency group)")
    jl.add_argument("--kind", help="only jobs of this kind (e.g. enable_protection)")
    jl.add_argument("--state", choices=["queued", "running", "waiting", "succeeded",
                                        "failed", "cancelled"], help="only jobs in this state")
    jl.add_argument("--active", action="store_true",
                    help="only queued, running or waiting jobs")
    jl.add_argument("--limit", type=int, help="at most this many (default 100)")
    jl.set_defaults(func=cmd_jobs_list)
    js = jsub.add_parser("show", help="show a job and its steps")
    js.add_argument("id", help="job id (from jobs list)")
    js.set_defaults(func=cmd_jobs_show)
    jw = jsub.add_parser("wait", help="follow a job until it ends (exit 1 if it failed)",
                         description="Print the job's progress whenever it changes until it "
                                     "ends. Exit 0 if it succeeded, 1 if it failed or was "
                                     "cancelled.")
    jw.add_argument("id")
    _timeout(jw)
    jw.set_defaults(func=cmd_jobs_wait)
    jc = jsub.add_parser("cancel", help="cancel a queued or running job")
    jc.add_argument("id")
    jc.set_defaults(func=cmd_jobs_cancel)
    verbs += [jl, js, jw, jc]
    for v in verbs:
        add_api_args(v)
    return jsub
