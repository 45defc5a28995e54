"""The agent bundle's entry point: ``siterecovery-agent version|run|replicate``.

A protected machine that got the agent bundle (``siterecovery agent bundle``) has no
``siterecovery`` command: only ``mobility/``, ``wire/``, ``common/`` and their
third-party closure. This module is what its launcher runs, so it may import nothing
else (tests/test_agent_bundle.py loads it with only the bundle on ``sys.path``).

Exit codes as the full command's: 0 done, 1 failed, 2 bad config (systemd's
``RestartPreventExitStatus=2`` then stops restarting a file that cannot work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog

from common.tomlconfig import ConfigError, load
from mobility import AGENT_VERSION
from mobility.agent import Agent
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.localenroll import LocalEnrollError, configure, request
from mobility.siteclient import SiteClient, SiteError

log = structlog.get_logger("siterecovery")

REQUIRED_FILES = ("tls_ca", "tls_cert", "tls_key")


def version_doc() -> dict[str, Any]:
    """What this agent is and what it runs on (``version --json``)."""
    return {"agent_version": AGENT_VERSION,
            "python": platform.python_version(),
            "implementation": sys.implementation.name,
            "machine": platform.machine(),
            "kernel": platform.release()}


def _configure_logs() -> None:
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars,
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout))


def _config(path: str) -> MobilityConfig:
    """The typed config, with every file it names readable; ``ConfigError`` otherwise."""
    cfg = load(MobilityConfig, path)
    for key in REQUIRED_FILES:
        name = getattr(cfg, key)
        if not os.access(name, os.R_OK):
            why = "does not exist" if not os.path.exists(name) else "cannot be read"
            raise ConfigError(f"{path}: key {key!r}: file {name!r} {why}")
    return cfg


async def _until_signal(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until SIGTERM/SIGINT, then cancel it and wait for it to end; a second
    signal aborts at once (exit 130), as the full command does."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    count = 0

    def on_signal() -> None:
        nonlocal count
        count += 1
        if count > 1:
            os._exit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    task = asyncio.create_task(work)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        waiter.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    if task.done() and not task.cancelled() and (error := task.exception()) is not None:
        raise error  # the work failed before any signal: the caller words it


async def _run(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    if not cfg.site_url:
        agent = Agent(cfg)
        try:
            await _until_signal(agent.run_forever())
        finally:
            agent.close()
        return 0
    async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as site:
        managed = ManagedAgent(cfg, site, config=Path(args.config),
                               renew_before_days=args.renew_before_days)
        try:
            await _until_signal(managed.run_forever())
        finally:
            managed.close()
    return 0


async def _replicate(args: argparse.Namespace) -> int:
    agent = Agent(_config(args.config))
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    print(json.dumps(r.__dict__))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="siterecovery-agent",
        description="The siterecovery Mobility agent as installed from the agent bundle.")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("version", help="print the agent's version")
    v.add_argument("--json", action="store_true",
                   help="also the Python, architecture and kernel it runs on, as JSON")
    run = sub.add_parser("run", help="replicate continuously (the systemd service)")
    run.add_argument("--config", required=True, help="mobility.toml")
    run.add_argument("--renew-before-days", type=float, default=30.0,
                     help="renew the certificate when it has fewer days left (default 30)")
    rp = sub.add_parser("replicate", help="run one replication cycle and exit (JSON result)")
    rp.add_argument("--config", required=True, help="mobility.toml")
    cr = sub.add_parser("csr", help="print a certificate request; the key stays in --dir",
                        description="Make DIR/agent.key (once; reused on a re-run) and print "
                                    "a PEM certificate request naming --machine. Used by "
                                    "the push install: the key never leaves this machine.")
    cr.add_argument("--dir", default="/etc/siterecovery", help="(default: %(default)s)")
    cr.add_argument("--machine", required=True, help="this machine's name in the inventory")
    cf = sub.add_parser("configure", help="write DIR/mobility.toml after enrollment",
                        description="With DIR/agent.key, DIR/agent.pem (its certificate) and "
                                    "DIR/ca.pem in place, write DIR/mobility.toml.")
    cf.add_argument("--dir", default="/etc/siterecovery", help="(default: %(default)s)")
    cf.add_argument("--machine", required=True)
    cf.add_argument("--server", required=True, help="process server HOST:PORT")
    cf.add_argument("--site", default="", help="site listener https://HOST:9441")
    cf.add_argument("--state-dir", default="/var/lib/siterecovery-mobility")
    cf.add_argument("--disk", action="append", default=[], help="NAME=PATH (repeat)")
    return p


def _local(args: argparse.Namespace) -> int:
    """``csr`` and ``configure``: exit 2 on bad arguments, 1 when the step fails."""
    directory = Path(args.dir)
    try:
        if args.cmd == "csr":
            sys.stdout.write(request(directory, args.machine).decode())
            return 0
        host, _, port = args.server.rpartition(":")
        disks = [tuple(d.split("=", 1)) for d in args.disk]
        if not host or not port.isdigit() or any(len(d) != 2 or not all(d) for d in disks):
            print("error: --server wants HOST:PORT and --disk NAME=PATH", file=sys.stderr)
            return 2
        out = configure(directory, machine=args.machine, server_host=host,
                        server_port=int(port), site_url=args.site, state_dir=args.state_dir,
                        disks=[(d[0], d[1]) for d in disks])
    except (LocalEnrollError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "version":
        print(json.dumps(version_doc()) if args.json else AGENT_VERSION)
        return 0
    if args.cmd in ("csr", "configure"):
        return _local(args)
    _configure_logs()
    try:
        return asyncio.run(_run(args) if args.cmd == "run" else _replicate(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (SiteError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
