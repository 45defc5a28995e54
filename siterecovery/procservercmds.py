"""CLI verbs: process servers (``procserver list|show|refresh|remove``), alerts and events.

Each calls the configuration server's admin API (``--api``, ``--token-file``) and prints a
table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
from typing import Any

from siterecovery.apiopts import add_api_args, call, call_and_show
from siterecovery.output import show, table


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _row(p: dict[str, Any]) -> dict[str, Any]:
    return {**p, "last": _ago(p["seconds_since_contact"]),
            "free": f"{p['cache_free_ratio']:.0%}",
            "backlog": f"{_seconds(p['backlog_seconds'])} / {_bytes(p['backlog_bytes'])}",
            "throughput": _bytes(p["throughput_bps"]) + "/s"}


COLUMNS = [("name", "NAME"), ("address", "ADDRESS"), ("version", "VERSION"),
           ("health", "HEALTH"), ("last", "LAST CONTACT"), ("free", "CACHE FREE"),
           ("backlog", "UPLOAD BACKLOG"), ("throughput", "THROUGHPUT"), ("sessions", "SESSIONS"),
           ("machines", "MACHINES")]


async def cmd_list(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/procservers", lambda doc: table(
        [_row(p) for p in doc["procservers"]], COLUMNS))


def _details(p: dict[str, Any]) -> str:
    r = _row(p)
    lines = [f"{k:<16}{v}" for k, v in (
        ("name", p["name"]), ("address", p["address"]), ("version", p["version"]),
        ("health", p["health"]), ("registered", p["registered_at"]),
        ("last contact", f"{p['last_contact']} ({r['last']})"),
        ("cache", f"{_bytes(p['cache_bytes'])} used, {r['free']} of the quota free"),
        ("upload backlog", r["backlog"]), ("throughput", r["throughput"]),
        ("sessions", p["sessions"]), ("machines", p["machines"]),
        ("refresh", "requested, waiting for the next heartbeat" if p["refresh_requested"]
         else "-"))]
    if p["alerts"]:
        lines.append("alerts:")
        lines += [f"  {a['severity']:<9}{a['code']}  since {a['since']}\n    {a['message']}"
                  for a in p["alerts"]]
    return "\n".join(lines)


async def cmd_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/procservers/{args.name}", _details)


async def cmd_refresh(args: argparse.Namespace) -> int:
    return await call_and_show(
        args, "POST", f"/api/v1/procservers/{args.name}/refresh",
        lambda _: f"refresh requested: {args.name} re-pulls its settings and heartbeats "
                  "again after its next heartbeat (see 'procserver show')")


async def cmd_remove(args: argparse.Namespace) -> int:
    await call(args, "DELETE", f"/api/v1/procservers/{args.name}")
    return show({"removed": args.name}, args, f"removed process server {args.name}")


EVENT_COLUMNS = [("time", "RAISED"), ("severity", "SEVERITY"), ("code", "CODE"),
                 ("target", "TARGET"), ("message", "MESSAGE")]


async def cmd_alerts(args: argparse.Namespace) -> int:
    columns = EVENT_COLUMNS + ([("cleared_at", "CLEARED")] if args.all else [])
    return await call_and_show(args, "GET", "/api/v1/events",
                               lambda doc: table(doc["events"], columns),
                               active=None if args.all else True, target=args.target,
                               limit=args.limit)


async def cmd_events(args: argparse.Namespace) -> int:
    active = True if args.active else False if args.cleared else None
    columns = [("id", "ID"), *EVENT_COLUMNS, ("cleared_at", "CLEARED")]
    return await call_and_show(args, "GET", "/api/v1/events",
                               lambda doc: table(doc["events"], columns), active=active,
                               target=args.target, code=args.code, limit=args.limit)


def _name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the process server's name (procserver list)")


def _limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=500, help="at most this many, newest first "
                                                          "(1-10000, default %(default)s)")


def register_under(psub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``list``, ``show``, ``refresh``, ``remove`` under the existing ``procserver``
    command."""
    p = psub.add_parser("list", help="process servers, their health and last contact",
                        description="List the process servers registered with the "
                                    "configuration server (each registers with its first "
                                    "heartbeat): address, version, health, last contact, cache "
                                    "free share, upload backlog (age of the oldest data waiting "
                                    "/ bytes), throughput, sessions, assigned machines.")
    add_api_args(p)
    p.set_defaults(func=cmd_list)
    p = psub.add_parser("show", help="one process server in detail, with its active alerts",
                        description="Show one process server: its last heartbeat's health "
                                    "and its active alerts (cache free < 30% warning, < 25% "
                                    "critical; upload backlog > 30 / 45 min; no heartbeat for "
                                    "15 min).")
    _name(p)
    add_api_args(p)
    p.set_defaults(func=cmd_show)
    p = psub.add_parser("refresh", help="make a process server re-pull its settings now",
                        description="Ask a process server to refresh: its next heartbeat is "
                                    "answered with the request, it re-pulls what it gets from "
                                    "the configuration server and heartbeats again at once.")
    _name(p)
    add_api_args(p)
    p.set_defaults(func=cmd_refresh)
    p = psub.add_parser("remove", help="forget a process server",
                        description="Remove a process server from the configuration server. "
                                    "Refused while machines are assigned to it. One that is "
                                    "still running registers again with its next heartbeat: "
                                    "stop it first.")
    _name(p)
    add_api_args(p)
    p.set_defaults(func=cmd_remove)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``alerts list`` and ``events list`` to the top-level subparsers."""
    a = sub.add_parser("alerts", help="process-server and RPO alerts")
    asub = a.add_subparsers(dest="alerts_cmd", required=True)
    p = asub.add_parser("list", help="the alerts that hold now (--all: cleared ones too)",
                        description="List alerts: process-server cache free space, upload "
                                    "backlog, missing heartbeats, and replicated items whose "
                                    "RPO exceeds their policy's threshold. An alert stays "
                                    "active while its condition holds.")
    p.add_argument("--all", action="store_true", help="include cleared alerts")
    p.add_argument("--target", help="only alerts about this process server or machine")
    _limit(p)
    add_api_args(p)
    p.set_defaults(func=cmd_alerts)

    e = sub.add_parser("events", help="the configuration server's event log")
    esub = e.add_subparsers(dest="events_cmd", required=True)
    p = esub.add_parser("list", help="events, newest first",
                        description="List events (alerts raised and cleared, newest first).")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--active", action="store_true", help="only active ones")
    state.add_argument("--cleared", action="store_true", help="only cleared ones")
    p.add_argument("--target", help="only events about this process server or machine")
    p.add_argument("--code", help="only events with this code")
    _limit(p)
    add_api_args(p)
    p.set_defaults(func=cmd_events)
