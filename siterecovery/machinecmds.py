"""CLI verbs: machines and the support matrix
(``siterecovery machine add|list|show|update|remove|support-matrix``), and the push
install of their agent (``machine install|upgrade|uninstall|host-key``): each queues its
job and follows it to the end, every step's message on stderr as it changes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from siterecovery.apiopts import add_api_args, call_and_show, client
from siterecovery.argtypes import seconds, wait_seconds
from siterecovery.errors import EXIT_FAIL, UsageError
from siterecovery.jobfollow import describe_job, follow
from siterecovery.output import show, table

COLUMNS = [("name", "NAME"), ("ip", "IP"), ("os", "OS"), ("kernel", "KERNEL"),
           ("disks", "DISKS"), ("process_server", "PROCESS SERVER"), ("account", "ACCOUNT"),
           ("enabled", "ENABLED"), ("replication", "REPLICATION"),
           ("last_contact", "LAST CONTACT")]


def disk_arg(text: str) -> dict[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH (e.g. sda=/dev/sda)")
    return {"name": name, "path": path}


def port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port


def _row(m: dict[str, Any]) -> dict[str, Any]:
    return {**m, "os": f"{m['os_name']} {m['os_version']}",
            "disks": ",".join(d["name"] for d in m["disks"]) or None,
            "enabled": "yes" if m["enabled"] else "no"}


def describe(m: dict[str, Any]) -> str:
    lines = [
        f"machine:         {m['name']}",
        f"IP:              {m['ip']}",
        f"SSH port:        {m['ssh_port']}",
        f"OS:              {m['os_type']} {m['os_name']} {m['os_version']}",
        f"kernel:          {m['kernel'] or '-'}",
        f"enabled:         {'yes' if m['enabled'] else 'no (its certificate is refused)'}",
        f"process server:  {m['process_server'] or '-'}",
        f"account:         {m['account'] or '-'}",
        f"replication:     {m['replication'] or 'not protected'}",
        f"agent version:   {m['agent_version'] or '-'}",
        f"host id:         {m.get('host_id') or '-'}",
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
    for k in ("ssh_port", "os_name", "os_version", "kernel", "process_server", "account"):
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
    for k in ("ip", "ssh_port", "os_name", "os_version", "kernel"):
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


async def cmd_push(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if getattr(args, "known_hosts", None):
        try:
            body["known_hosts"] = Path(args.known_hosts).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --known-hosts {args.known_hosts}: {e}") from None
    for k in ("forget_host_key", "server", "site_url"):
        if getattr(args, k, None):
            body[k] = getattr(args, k)
    if getattr(args, "heartbeat_timeout", None):
        body["heartbeat_timeout_seconds"] = args.heartbeat_timeout
    async with client(args) as api:
        job = (await api.post(f"/api/v1/machines/{args.name}/{args.action}", body))["job"]
        if args.no_wait:
            return show(job, args, f"{job['title']} queued for {args.name}: job {job['id']}"
                                   f"\nfollow it: siterecovery jobs wait {job['id']}")
        job = await follow(api, job, args.timeout)
    show(job, args, describe_job(job))
    return 0 if job["state"] == "succeeded" else EXIT_FAIL


def _host_key(doc: dict[str, Any]) -> str:
    if not doc["host_key"]:
        return f"{doc['machine']}: no host key recorded (the next push install trusts the " \
               "first one it sees)"
    return f"{doc['machine']}: {doc['fingerprint']} ({doc['source']})\n{doc['host_key']}"


async def cmd_host_key(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/machines/{args.name}/host-key",
                               _host_key)


def _push_verbs(msub: argparse._SubParsersAction[argparse.ArgumentParser]
                ) -> list[argparse.ArgumentParser]:
    out = []
    for action, help_, desc in (
            ("install", "push-install the Mobility agent over SSH",
             "The machine's process server logs in over SSH with its account, checks the "
             "prerequisites one by one, copies the agent bundle over SFTP and installs it, "
             "enrolls the agent (its key is made on the machine; the CA signs its request), "
             "enables and starts its systemd unit and waits for its first heartbeat. The "
             "first host key seen is recorded (trust on first use) unless --known-hosts "
             "gives it; a changed key refuses the install. On an installed machine it "
             "verifies and changes nothing."),
            ("upgrade", "replace the agent by the process server's bundle, keeping its state",
             "As install, for a machine whose agent is installed: the program files are "
             "replaced; its config, certificate and state (the block maps) are kept, so its "
             "next cycle is a delta."),
            ("uninstall", "remove the agent and everything its install listed",
             "Stops the agent and removes every path its install listed (program files, "
             "unit, config, certificate, state), then checks that each one is gone.")):
        v = msub.add_parser(action, help=help_, description=desc)
        v.add_argument("name")
        v.set_defaults(func=cmd_push, action=action)
        v.add_argument("--known-hosts", metavar="FILE",
                       help="an OpenSSH known_hosts file with the machine's host key: "
                            "recorded as the operator's and pinned")
        v.add_argument("--forget-host-key", action="store_true",
                       help="forget the recorded host key first (a machine really "
                            "reinstalled): the next one seen is trusted")
        if action != "uninstall":
            v.add_argument("--server", metavar="HOST:PORT",
                           help="where the agent replicates to until its first settings "
                                "(default, and afterwards: its process server's address "
                                "from the heartbeat)")
            v.add_argument("--site-url", metavar="URL",
                           help="the configuration server's site listener as the machine "
                                "reaches it (default: from site_names/site_host)")
            v.add_argument("--heartbeat-timeout", type=seconds, metavar="SECONDS",
                           help="how long to wait for the agent's first heartbeat "
                                "(default 600)")
        v.add_argument("--no-wait", action="store_true",
                       help="queue the job and return (follow it: siterecovery jobs wait)")
        v.add_argument("--timeout", type=wait_seconds, metavar="SECONDS",
                       help="stop following after this long (the job goes on)")
        out.append(v)
    hk = msub.add_parser("host-key", help="the machine's recorded SSH host key")
    hk.add_argument("name")
    hk.set_defaults(func=cmd_host_key)
    return [*out, hk]


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
    a.add_argument("--ssh-port", type=port_arg, metavar="PORT",
                   help="the port of its sshd, for push installs (default: 22)")
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
    u.add_argument("--ssh-port", type=port_arg, metavar="PORT",
                   help="the port of its sshd, for push installs")
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
    for verb in (a, ls, s, u, r, sm, *_push_verbs(msub)):
        add_api_args(verb)
