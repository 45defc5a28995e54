"""The options and the display of an item's recovery settings, shared by
``failover settings`` and ``items update``, and the options of re-protect and failback
shared by ``plan`` and ``group`` (verb modules meet only in cli.py)."""

from __future__ import annotations

import argparse
from typing import Any

from siterecovery.argtypes import seconds

SETTINGS = ("target", "vm_name", "cpus", "memory_mib", "azure_size", "network",
            "drill_network", "ip", "mac", "boot_marker", "firmware", "disks")


def add_settings_args(s: argparse.ArgumentParser) -> None:
    """The options that change an item's recovery settings (``failover settings`` and
    ``items update``)."""
    s.add_argument("--target", help="folder | libvirt | azure")
    s.add_argument("--vm-name", dest="vm_name", help="the recovered VM's name")
    s.add_argument("--cpus", type=int)
    s.add_argument("--memory-mib", dest="memory_mib", type=int)
    s.add_argument("--azure-size", dest="azure_size", help="e.g. Standard_D2s_v5")
    s.add_argument("--network", help="the target network for failover")
    s.add_argument("--drill-network", dest="drill_network",
                   help="the target network for drills (isolated)")
    s.add_argument("--ip", help="a static address (192.0.2.10/24) or 'dhcp'")
    s.add_argument("--mac")
    s.add_argument("--boot-marker", dest="boot_marker",
                   help="console text that proves a boot (default: a login prompt)")
    s.add_argument("--firmware", help="bios | uefi")
    s.add_argument("--disks", help="the disks to recover, comma-separated, in order "
                                   "('' for every disk)")
    s.add_argument("--reset", action="append", choices=SETTINGS, metavar="SETTING",
                   help="set SETTING back to its default (repeatable)")


def settings_change(args: argparse.Namespace) -> dict[str, Any]:
    """The recovery settings the options of ``add_settings_args`` change."""
    change: dict[str, Any] = {k: getattr(args, k) for k in SETTINGS
                              if getattr(args, k) is not None}
    if "disks" in change:
        change["disks"] = [d for d in change["disks"].split(",") if d]
    for name in args.reset or []:
        change[name] = None
    return change


def describe_settings(item: dict[str, Any]) -> str:
    r = item["recovery"]
    lines = [f"{item['machine']} ({item['state']}): recovery settings"]
    for k in SETTINGS:
        v = r[k]
        shown = ", ".join(v) or "(every disk)" if k == "disks" else (
            "(dhcp)" if k == "ip" and v is None else "-" if v is None else v)
        lines.append(f"  {k}: {shown}")
    for title, key in (("last drill", "last_drill"), ("failover", "failover")):
        rec = item.get(key)
        if rec:
            lines.append(f"{title}: {rec.get('result')} (job {rec.get('job')}), point "
                         f"{rec.get('point')}, RTO {rec.get('rto_seconds')} s")
    return "\n".join(lines)


def back_body(verb: str, args: argparse.Namespace) -> dict[str, Any]:
    """The item options of re-protect or failback (``back_args``), for the request."""
    if verb == "reprotect":
        return {"pause": args.pause, "live": args.live, "agent": args.agent}
    return {"timeout_seconds": args.agent_timeout,
            "shutdown_timeout_seconds": args.shutdown_timeout}


def reprotect_args(p: argparse.ArgumentParser) -> None:
    """How Re-protect reads a recovered libvirt domain that runs (else it is refused)."""
    how = p.add_mutually_exclusive_group()
    how.add_argument("--live", action="store_true",
                     help="copy its disks at one moment while it runs on (a libvirt push "
                          "backup into its pool folder: scratch space as large as its "
                          "disks; a crash-consistent point; the guest never pauses)")
    how.add_argument("--pause", action="store_true",
                     help="read it paused (the guest stands still for the read; a "
                          "crash-consistent point; no scratch space)")
    how.add_argument("--agent", action="store_true",
                     help="let the Mobility agent inside the recovered machine replicate it "
                          "instead (any target; continuous until a failback; its first "
                          "cycle sends only the blocks written since the failover point); "
                          "the job ends at its first point")


def back_args(p: argparse.ArgumentParser, verb: str) -> None:
    """The options of ``siterecovery failover reprotect|failback``, for every item."""
    if verb == "reprotect":
        reprotect_args(p)
        return
    p.add_argument("--agent-timeout", type=seconds, metavar="SECONDS",
                   help="how long each item's job waits for its original machine's agent "
                        "(default: 6 hours)")
    p.add_argument("--shutdown-timeout", type=seconds, metavar="SECONDS",
                   help="a recovered libvirt domain still running is asked to shut down; "
                        "how long to wait for it (default: the server's "
                        "failover_shutdown_timeout_seconds, 600)")
