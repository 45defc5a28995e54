"""CLI verbs: machines and the support matrix
(``siterecovery machine add|list|show|update|remove|support-matrix``)."""

from __future__ import annotations

import argparse
from typing import Any

from siterecovery.apiopts import add_api_args, call_and_show
from siterecovery.errors import UsageError
from siterecovery.output import table

COLUMNS = [("name", "NAME"), ("ip", "IP"), ("os", "OS"), ("kernel", "KERNEL"),
           ("disks", "DISKS"), ("process_server", "PROCESS SERVER"), ("account", "ACCOUNT"),
           ("enabled", "ENABLED"), ("replication", "REPLICATION"),
           ("last_contact", "LAST CONTACT")]


def disk_arg(text: str) -> dict[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH (e.g. sda=/dev/sda)")
    return {"name": name, "path": path}


def _row(m: dict[str, Any]) -> dict[str, Any]:
    return {**m, "os": f"{m['os_name']} {m['os_version']}",
            "disks": ",".join(d["name"] for d in m["disks"]) or None,
            "enabled": "yes" if m["enabled"] else "no"}


def describe(m: dict[str, Any]) -> str:
    lines = [
        f"machine:         {m['name']}",
        f"IP:              {m['ip']}",
        f"OS:              {m['os_type']} {m['os_name']} {m['os_version']}",
        f"kernel:          {m['kernel'] or '-'}",
        f"enabled:         {'yes' if m['enabled'] else 'no (its certificate is refused)'}",
        f"process server:  {m['process_server'] or '-'}",
        f"account:         {m['account'] or '-'}",
        f"replication:     {m['replication'] or 'not protected'}",
        f"agent version:   {m['agent_version'] or '-'}",
        f"last contact:    {m['last_contact'] or 'never'}",
        f"created:         {m['created']}",
        f"disks:           {len(m['disks']) or 'none given'}",
    ]
    lines += [f"  {d['name']}: {d['path']}"
              + (f" ({d['size_bytes']} bytes)" if d["size_bytes"] else "") for d in m["disks"]]
    return "\n".join(lines)


def describe_matrix(doc: dict[str, Any]) -> str:
    lines = [f"{t['os_type']}: {'supported' if t['supported'] else 'not supported'}"
             + (f" - {t['note']}" if not t["supported"] else "") for t in doc["os_types"]]
    rows = [{"display": d["display_name"], "os_name": d["os_name"],
             "versions": ", ".join(f"{v['os_version']} (kernel {v['min_kernel']}+)"
                                   for v in d["versions"])} for d in doc["distributions"]]
    return "\n".join([*lines, "", table(rows, [("display", "DISTRIBUTION"),
                                                ("os_name", "OS NAME"),
                                                ("versions", "VERSIONS")])])


async def cmd_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "ip": args.ip, "os_type": args.os_type,
                            "disks": args.disk or []}
    for k in ("os_name", "os_version", "kernel", "process_server", "account"):
        if getattr(args, k) is not None:
            body[k] = getattr(args, k)
    return await call_and_show(args, "POST", "/api/v1/machines", describe, body)


async def cmd_list(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/machines",
                               lambda doc: table([_row(m) for m in doc["machines"]], COLUMNS))


async def cmd_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/machines/{args.name}", describe)


async def cmd_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.enabled is not None:
        body["enabled"] = args.enabled
    for k in ("ip", "os_name", "os_version", "kernel"):
        if getattr(args, k) is not None:
            body[k] = getattr(args, k)
    if args.disk is not None or args.no_disks:
        body["disks"] = args.disk or []
    for k in ("process_server", "account"):
        if getattr(args, k) is not None:
            body[k] = getattr(args, k) or None  # "" from --no-...
    if not body:
        raise UsageError("nothing to change: see 'siterecovery machine update --help'")
    return await call_and_show(args, "PATCH", f"/api/v1/machines/{args.name}", describe, body)


async def cmd_remove(args: argparse.Namespace) -> int:
    return await call_and_show(args, "DELETE", f"/api/v1/machines/{args.name}",
                               lambda _: f"machine {args.name} removed (its agent "
                                         "certificates are revoked)")


async def cmd_matrix(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/support-matrix", describe_matrix)


def _os_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--os-name", help="ID from the machine's /etc/os-release: ubuntu, debian, "
                                     "rhel, rocky, almalinux, centos, ol")
    p.add_argument("--os-version", help="VERSION_ID from /etc/os-release, e.g. 22.04 or 9.3")
    p.add_argument("--kernel", help="'uname -r' of the machine (checked against the "
                                    "matrix's minimum kernel when given)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's verbs to the top-level subparsers."""
    p = sub.add_parser("machine", help="the machines that can be protected",
                       description="The inventory of machines: name, IP, OS (checked "
                                   "against the support matrix), disks, the process server "
                                   "that receives their data and the push-install account.")
    msub = p.add_subparsers(dest="machine_cmd", required=True, metavar="VERB")
    a = msub.add_parser("add", help="add a machine",
                        description="Add a machine. Its OS must be in the support matrix "
                                    "('siterecovery machine support-matrix'); Windows is not "
                                    "supported yet.")
    a.add_argument("name", help="machine name, also its certificate's CN")
    a.add_argument("--ip", required=True, help="the machine's IPv4 or IPv6 address")
    a.add_argument("--os-type", choices=["linux", "windows"], default="linux",
                   help="default: %(default)s")
    _os_options(a)
    a.add_argument("--disk", action="append", type=disk_arg, metavar="NAME=PATH",
                   help="a disk to protect: block device or image file (repeat for more)")
    a.add_argument("--process-server", help="the process server that receives its data")
    a.add_argument("--account", help="push-install account ('siterecovery account add')")
    a.set_defaults(func=cmd_add)
    ls = msub.add_parser("list", help="list machines")
    ls.set_defaults(func=cmd_list)
    s = msub.add_parser("show", help="show one machine")
    s.add_argument("name")
    s.set_defaults(func=cmd_show)
    u = msub.add_parser("update", help="enable/disable a machine or change its settings",
                        description="Change a machine. --disable makes the configuration "
                                    "server and process servers refuse its certificate "
                                    "until --enable. --disk replaces the whole disk list.")
    u.add_argument("name")
    en = u.add_mutually_exclusive_group()
    en.add_argument("--enable", dest="enabled", action="store_const", const=True,
                    help="accept the machine's certificate again")
    en.add_argument("--disable", dest="enabled", action="store_const", const=False,
                    help="refuse the machine's certificate (enrollment, settings, "
                         "replication) until --enable")
    u.add_argument("--ip", help="new IP address")
    _os_options(u)
    dk = u.add_mutually_exclusive_group()
    dk.add_argument("--disk", action="append", type=disk_arg, metavar="NAME=PATH",
                    help="the new disk list (repeat for more disks)")
    dk.add_argument("--no-disks", action="store_true", help="clear the disk list")
    for what, hlp in (("process-server", "the process server"),
                      ("account", "the push-install account")):
        g = u.add_mutually_exclusive_group()
        dest = what.replace("-", "_")
        g.add_argument(f"--{what}", dest=dest, help=f"set {hlp}")
        g.add_argument(f"--no-{what}", dest=dest, action="store_const", const="",
                       help=f"unset {hlp}")
    u.set_defaults(func=cmd_update)
    r = msub.add_parser("remove", help="remove a machine (refused while it is protected)",
                        description="Remove a machine and revoke its agent certificates. "
                                    "Refused while it is protected: run 'siterecovery "
                                    "replication disable NAME' first.")
    r.add_argument("name")
    r.set_defaults(func=cmd_remove)
    sm = msub.add_parser("support-matrix", help="which operating systems are supported")
    sm.set_defaults(func=cmd_matrix)
    for verb in (a, ls, s, u, r, sm):
        add_api_args(verb)
