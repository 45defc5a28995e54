"""CLI verbs: ``failover settings|test|cleanup|start|change-point|commit MACHINE``.

Each recovery verb queues its job on the configuration server (REST
``/api/v1/items/{machine}/...``) and prints it; ``--wait`` follows it to the end (exit 1
if it failed). ``settings`` shows or changes the item's recovery settings.
"""

from __future__ import annotations

import argparse
from typing import Any

from siterecovery.apiopts import add_api_args, call_and_show
from siterecovery.argtypes import mbps, seconds, wait_seconds
from siterecovery.jobfollow import start_and_follow
from siterecovery.recoveryopts import (
    add_settings_args,
    back_body,
    describe_settings,
    reprotect_args,
    settings_change,
)


async def _start(args: argparse.Namespace, verb: str, body: dict[str, Any]) -> int:
    return await start_and_follow(args, f"/api/v1/items/{args.machine}/{verb}", args.machine, body)


async def cmd_test(args: argparse.Namespace) -> int:
    return await _start(args, "test-failover", {"point": args.point, "at": args.at,
                                                "network": args.network,
                                                "drain_timeout_seconds": args.drain_timeout,
                                                **_instant_body(args)})


async def cmd_cleanup(args: argparse.Namespace) -> int:
    return await _start(args, "cleanup-test-failover", {"notes": args.notes})


async def cmd_start(args: argparse.Namespace) -> int:
    return await _start(args, "failover", {"point": args.point, "at": args.at,
                                           "network": args.network,
                                           "drain_timeout_seconds": args.drain_timeout,
                                           "shutdown_source": args.shutdown_source,
                                           "shutdown_timeout_seconds": args.shutdown_timeout,
                                           **_instant_body(args)})


async def cmd_change_point(args: argparse.Namespace) -> int:
    return await _start(args, "change-recovery-point", {
        "point": args.point, "at": args.at, "network": args.network,
        "drain_timeout_seconds": args.drain_timeout})


async def cmd_commit(args: argparse.Namespace) -> int:
    return await _start(args, "commit", {})


async def cmd_reprotect(args: argparse.Namespace) -> int:
    return await _start(args, "reprotect", back_body("reprotect", args))


async def cmd_failback(args: argparse.Namespace) -> int:
    return await _start(args, "failback", {"timeout_seconds": args.agent_timeout,
                                           "shutdown_timeout_seconds": args.shutdown_timeout})





async def cmd_settings(args: argparse.Namespace) -> int:
    change = settings_change(args)
    if not change:
        return await call_and_show(args, "GET", f"/api/v1/items/{args.machine}",
                                   describe_settings)
    return await call_and_show(args, "PATCH", f"/api/v1/items/{args.machine}/recovery",
                               describe_settings, change)


def _point_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--point", help="latest-processed (default), latest, "
                                   "latest-app-consistent, latest-crash-consistent, or a "
                                   "point id")
    p.add_argument("--at", metavar="TIME",
                   help="the newest point created at or before TIME (ISO 8601)")
    p.add_argument("--network", help="the target's network for this run (default: the "
                                     "item's setting)")
    p.add_argument("--drain-timeout", type=seconds, metavar="SECONDS",
                   help="with --point latest: how long to wait for the process server to "
                        "upload what it acknowledged (default: the server's "
                        "failover_drain_timeout_seconds, 1800)")





def _instant_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"instant": args.instant, "hydrate_rate_mbps": args.hydrate_rate}


def _instant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instant", action="store_true",
                   help="instant recovery (libvirt target): boot on the disks served over NBD "
                        "straight from the vault, copy them in the background, then move the "
                        "machine onto the copies without a reboot")
    p.add_argument("--hydrate-rate", type=mbps, metavar="MBPS",
                   help="with --instant: the background copy's rate from the vault in Mbit/s "
                        "(0 or absent: unlimited)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's verbs to the top-level subparsers."""
    f = sub.add_parser("failover", help="drills (test failover), failover, commit; recovery "
                                        "settings",
                       description="Recover a replicated item's machine onto its target "
                                   "(folder, libvirt, azure): test failover (a drill) and its "
                                   "cleanup, failover, change of recovery point, commit.")
    fsub = f.add_subparsers(dest="failover_cmd", required=True, metavar="VERB")
    verbs: list[argparse.ArgumentParser] = []
    s = fsub.add_parser("settings", help="show or change an item's recovery settings",
                        description="Without options, show them. Each option changes one "
                                    "setting; --reset NAME sets one back to its default.")
    s.add_argument("machine")
    add_settings_args(s)
    s.set_defaults(func=cmd_settings)
    verbs.append(s)
    for name, func, help_, extra in (
            ("test", cmd_test, "test failover (a drill; replication goes on)", _point_args),
            ("cleanup", cmd_cleanup, "clean up a test failover (notes required)", None),
            ("start", cmd_start, "fail over (not cancellable; replication stops)",
             _point_args),
            ("change-point", cmd_change_point, "recover another point of a failed-over "
                                               "item (before commit)", _point_args),
            ("commit", cmd_commit, "commit a failover: its recovery points are deleted",
             None),
            ("failback", cmd_failback, "fail back onto the original machine: its agent "
                                       "writes only the blocks that differ", None),
            ("reprotect", cmd_reprotect, "replicate the recovered machine into the vault "
                                         "(a delta on the failover point)", None)):
        v = fsub.add_parser(name, help=help_)
        v.add_argument("machine")
        if extra is not None:
            extra(v)
        v.add_argument("--wait", action="store_true", help="follow the job to its end")
        v.add_argument("--timeout", type=wait_seconds, metavar="SECONDS",
                       help="stop waiting after this long (the job goes on)")
        v.set_defaults(func=func)
        verbs.append(v)
    verbs[2].add_argument("--notes", required=True, help="what the drill showed")
    verbs[6].add_argument("--agent-timeout", type=seconds, metavar="SECONDS",
                          help="how long the job waits for the original machine's agent "
                               "(default: 6 hours)")
    reprotect_args(verbs[7])
    verbs[6].add_argument("--shutdown-timeout", type=seconds, metavar="SECONDS",
                          help="a recovered libvirt domain still running is asked to shut "
                               "down; how long to wait for it (default: the server's "
                               "failover_shutdown_timeout_seconds, 600)")
    _instant_args(verbs[1])
    _instant_args(verbs[3])
    verbs[3].add_argument("--shutdown-source", action="store_true",
                          help="first ask the source's agent for a last delta cycle and a "
                               "shutdown (with --point latest nothing it wrote is lost); "
                               "the failover goes on if the agent does not answer")
    verbs[3].add_argument("--shutdown-timeout", type=seconds, metavar="SECONDS",
                          help="how long to wait for the agent's answer (default: the "
                               "server's failover_shutdown_timeout_seconds, 600)")
    for v in verbs:
        add_api_args(v)
