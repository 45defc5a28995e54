"""CLI verbs: replication policies (``siterecovery policy create|list|show|update|delete``)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

from siterecovery.apiopts import add_api_args, call_and_show
from siterecovery.errors import UsageError
from siterecovery.output import table

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZES = {"": 1, "k": 1 << 10, "m": 1 << 20}


def duration(text: str, bare: str = "s") -> int:
    """``90``, ``90s``, ``15m``, ``4h``, ``2d`` → seconds (a bare number is in ``bare``)."""
    m = re.fullmatch(r"([0-9]{1,9})\s*([smhd]?)", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 15m, 4h, 2d)")
    return int(m.group(1)) * _UNITS[m.group(2) or bare]


def _hours(text: str) -> int:
    seconds = duration(text, bare="h")
    if seconds % 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of hours "
                                         "(e.g. 24h, 36, 7d)")
    return seconds // 3600


def _frequency(text: str) -> int:
    return 0 if text.strip().lower() in ("off", "none") else duration(text)


def size(text: str) -> int:
    """``65536``, ``64K``, ``64KiB``, ``1M`` → bytes."""
    m = re.fullmatch(r"([0-9]{1,12})\s*([km]?)(i?b)?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 64K, 256K, 1M)")
    return int(m.group(1)) * _SIZES[m.group(2)]


def human_duration(seconds: int) -> str:
    if seconds == 0:
        return "off"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def human_size(n: int) -> str:
    for unit, m in (("M", 1 << 20), ("K", 1 << 10)):
        if n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


# (API field, option, argparse type, help)
OPTIONS: list[tuple[str, str, Callable[[str], int], str]] = [
    ("rpo_threshold_seconds", "--rpo-threshold", duration,
     "alert when an item's newest recovery point is older than this; it only alerts "
     "(60s-24h; default 15m)"),
    ("retention_hours", "--retention", _hours,
     "how long recovery points are kept, in hours or days (1h-15d; default 24h)"),
    ("app_consistent_frequency_seconds", "--app-consistent-frequency", _frequency,
     "an app-consistent point this often, a multiple of the crash-consistent interval, "
     "or 'off' (up to 12h; default 4h)"),
    ("crash_consistent_interval_seconds", "--crash-consistent-interval", duration,
     "a crash-consistent point this often (5s up to the RPO threshold; default 1m)"),
    ("block_size", "--block-size", size,
     "block size: 64K, 128K, 256K, 512K or 1M (default 64K)"),
]
COLUMNS = [("name", "NAME"), ("rpo", "RPO THRESHOLD"), ("retention", "RETENTION"),
           ("app", "APP-CONSISTENT"), ("crash", "CRASH-CONSISTENT"), ("block", "BLOCK"),
           ("items", "ITEMS")]


def _row(p: dict[str, Any]) -> dict[str, Any]:
    return {"name": p["name"], "rpo": human_duration(p["rpo_threshold_seconds"]),
            "retention": f"{p['retention_hours']}h",
            "app": human_duration(p["app_consistent_frequency_seconds"]),
            "crash": human_duration(p["crash_consistent_interval_seconds"]),
            "block": human_size(p["block_size"]), "items": p["items"]}


def describe(p: dict[str, Any]) -> str:
    return "\n".join([
        f"policy:                    {p['name']}",
        f"RPO threshold:             {human_duration(p['rpo_threshold_seconds'])} "
        f"({p['rpo_threshold_seconds']} s, alert only)",
        f"retention:                 {p['retention_hours']} h",
        "app-consistent frequency:  "
        f"{human_duration(p['app_consistent_frequency_seconds'])}",
        "crash-consistent interval: "
        f"{human_duration(p['crash_consistent_interval_seconds'])}",
        f"block size:                {human_size(p['block_size'])} ({p['block_size']} bytes)",
        f"replicated items:          {p['items']}",
        f"created:                   {p['created']}",
        f"updated:                   {p['updated']}",
    ])


def _fields(args: argparse.Namespace) -> dict[str, int]:
    return {f: getattr(args, f) for f, *_ in OPTIONS if getattr(args, f) is not None}


async def cmd_create(args: argparse.Namespace) -> int:
    return await call_and_show(args, "POST", "/api/v1/policies", describe,
                               {"name": args.name, **_fields(args)})


async def cmd_list(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/policies",
                               lambda doc: table([_row(p) for p in doc["policies"]], COLUMNS))


async def cmd_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/policies/{args.name}", describe)


async def cmd_update(args: argparse.Namespace) -> int:
    fields = _fields(args)
    if not fields:
        raise UsageError("nothing to change: give at least one of "
                         + ", ".join(o for _, o, *_ in OPTIONS))
    return await call_and_show(args, "PATCH", f"/api/v1/policies/{args.name}", describe,
                               fields)


async def cmd_delete(args: argparse.Namespace) -> int:
    return await call_and_show(args, "DELETE", f"/api/v1/policies/{args.name}",
                               lambda _: f"policy {args.name} deleted")


def _options(p: argparse.ArgumentParser) -> None:
    for field, option, kind, help_ in OPTIONS:
        p.add_argument(option, dest=field, type=kind,
                       metavar="SIZE" if field == "block_size" else "DURATION", help=help_)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's verbs to the top-level subparsers."""
    p = sub.add_parser("policy", help="replication policies: RPO threshold, retention, "
                       "consistency points, block size",
                       description="A replication policy says how often protected machines "
                                   "take crash- and app-consistent recovery points, how long "
                                   "points are kept, when an RPO alert is raised and the "
                                   "block size. A 'default' policy always exists.")
    psub = p.add_subparsers(dest="policy_cmd", required=True, metavar="VERB")
    c = psub.add_parser("create", help="create a policy (unset fields take the defaults)",
                        description="Create a replication policy; fields left out take the "
                                    "defaults (RPO threshold 15m, retention 24h, "
                                    "app-consistent every 4h, crash-consistent every 1m, "
                                    "64K blocks).")
    c.add_argument("name", help="policy name ([A-Za-z0-9_.-], up to 63)")
    _options(c)
    c.set_defaults(func=cmd_create)
    ls = psub.add_parser("list", help="list policies and how many items use each")
    ls.set_defaults(func=cmd_list)
    s = psub.add_parser("show", help="show one policy")
    s.add_argument("name")
    s.set_defaults(func=cmd_show)
    u = psub.add_parser("update", help="change some fields of a policy",
                        description="Change the given fields; the policy is validated as a "
                                    "whole. The block size of a policy in use cannot change.")
    u.add_argument("name")
    _options(u)
    u.set_defaults(func=cmd_update)
    d = psub.add_parser("delete", help="delete a policy (not 'default', nor one in use)")
    d.add_argument("name")
    d.set_defaults(func=cmd_delete)
    for verb in (c, ls, s, u, d):
        add_api_args(verb)
