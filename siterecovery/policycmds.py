"""CLI verbs: replication policies (``siterecovery policy create|list|show|update|delete``)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

from siterecovery.apiopts import add_api_args, call, call_and_show
from siterecovery.argtypes import mbps
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


# (send-limit field, option, argparse type, metavar, help)
LIMIT_OPTIONS: list[tuple[str, str, Callable[[str], Any], str, str]] = [
    ("work_mbps", "--send-limit-work", mbps, "MBPS",
     "the agents' send limit towards the process server during the work hours of the work "
     "days, in Mbit/s (0: unlimited); overrides each agent's mobility.toml"),
    ("off_mbps", "--send-limit-off", mbps, "MBPS",
     "the agents' send limit outside the work hours, in Mbit/s (0: unlimited)"),
    ("work_days", "--work-days", str, "DAYS",
     "the work days of the send limit, e.g. mon-fri or mon,wed,fri (default mon-fri)"),
    ("work_hours", "--work-hours", str, "HH:MM-HH:MM",
     "the work hours of the send limit (default 08:00-18:00)"),
]


def human_limit(limit: dict[str, Any] | None) -> str:
    """``10 Mbit/s mon-fri 08:00-18:00, unlimited otherwise``; none: the agents' own."""
    if limit is None:
        return "none (each agent's mobility.toml)"

    def rate(v: float) -> str:
        return "unlimited" if not v else f"{v:g} Mbit/s"

    return (f"{rate(limit['work_mbps'])} {limit['work_days']} {limit['work_hours']}, "
            f"{rate(limit['off_mbps'])} otherwise")


COLUMNS = [("name", "NAME"), ("rpo", "RPO THRESHOLD"), ("retention", "RETENTION"),
           ("app", "APP-CONSISTENT"), ("crash", "CRASH-CONSISTENT"), ("block", "BLOCK"),
           ("limit", "SEND LIMIT WORK/OFF MBPS"), ("items", "ITEMS")]


def _row(p: dict[str, Any]) -> dict[str, Any]:
    return {"name": p["name"], "rpo": human_duration(p["rpo_threshold_seconds"]),
            "retention": f"{p['retention_hours']}h",
            "app": human_duration(p["app_consistent_frequency_seconds"]),
            "crash": human_duration(p["crash_consistent_interval_seconds"]),
            "block": human_size(p["block_size"]),
            "limit": "-" if p.get("send_limit") is None else
            f"{p['send_limit']['work_mbps']:g}/{p['send_limit']['off_mbps']:g}",
            "items": p["items"]}


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
        f"agents' send limit:        {human_limit(p.get('send_limit'))}",
        f"replicated items:          {p['items']}",
        f"created:                   {p['created']}",
        f"updated:                   {p['updated']}",
    ])


def _fields(args: argparse.Namespace) -> dict[str, int]:
    return {f: getattr(args, f) for f, *_ in OPTIONS if getattr(args, f) is not None}


def _limit_given(args: argparse.Namespace) -> dict[str, Any]:
    return {f: getattr(args, f"limit_{f}") for f, *_ in LIMIT_OPTIONS
            if getattr(args, f"limit_{f}") is not None}


def _send_limit(args: argparse.Namespace, current: dict[str, Any] | None) -> dict[str, Any]:
    """The ``send_limit`` field to send (none if no send-limit option was given): the
    given values over the policy's ``current`` limit."""
    given = _limit_given(args)
    if args.no_send_limit:
        if given:
            raise UsageError("--no-send-limit cannot go with the other send-limit options")
        return {"send_limit": None}
    if not given:
        return {}
    limit = {**(current or {}), **given}
    missing = [o for f, o, *_ in LIMIT_OPTIONS[:2] if f not in limit]
    if missing:
        raise UsageError(f"a send limit needs {' and '.join(missing)} (0: unlimited)")
    return {"send_limit": limit}


async def cmd_create(args: argparse.Namespace) -> int:
    return await call_and_show(args, "POST", "/api/v1/policies", describe,
                               {"name": args.name, **_fields(args),
                                **_send_limit(args, None)})


async def cmd_list(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/policies",
                               lambda doc: table([_row(p) for p in doc["policies"]], COLUMNS))


async def cmd_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/policies/{args.name}", describe)


async def cmd_update(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = dict(_fields(args))
    if _limit_given(args) and not args.no_send_limit:
        # the options given change the policy's current limit, the others stay
        current = (await call(args, "GET", f"/api/v1/policies/{args.name}"))
        fields.update(_send_limit(args, current.get("send_limit")))
    else:
        fields.update(_send_limit(args, None))
    if not fields:
        raise UsageError("nothing to change: give at least one of "
                         + ", ".join([o for _, o, *_ in OPTIONS]
                                     + [o for _, o, *_ in LIMIT_OPTIONS]
                                     + ["--no-send-limit"]))
    return await call_and_show(args, "PATCH", f"/api/v1/policies/{args.name}", describe,
                               fields)


async def cmd_delete(args: argparse.Namespace) -> int:
    return await call_and_show(args, "DELETE", f"/api/v1/policies/{args.name}",
                               lambda _: f"policy {args.name} deleted")


def _options(p: argparse.ArgumentParser) -> None:
    for field, option, kind, help_ in OPTIONS:
        p.add_argument(option, dest=field, type=kind,
                       metavar="SIZE" if field == "block_size" else "DURATION", help=help_)
    for field, option, limit_kind, metavar, help_ in LIMIT_OPTIONS:
        p.add_argument(option, dest=f"limit_{field}", type=limit_kind, metavar=metavar,
                       help=help_)
    p.add_argument("--no-send-limit", action="store_true",
                   help="no send limit in the policy: each agent's mobility.toml applies "
                        "(the default)")


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
