"""``siterecovery``: one command for the daemons and the admin verbs.

The composition root: it builds the parser from the verb modules, runs the verb, and
turns what the verb raised into ``error: ...`` and an exit code (siterecovery/errors.py:
0 success, 1 failure, 2 bad usage or configuration, 3 the vault holds damaged data, 4 the
key does not open the vault).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from configserver.config import ConfigServerConfig
from procserver.config import ProcServerConfig
from siterecovery import (
    __version__,
    accountcmds,
    agentbundlecmds,
    agentcmds,
    certcmds,
    checkcmds,
    failovercmds,
    groupcmds,
    instantcmds,
    keycmds,
    machinecmds,
    migratecmds,
    notifycmds,
    plancmds,
    policycmds,
    procservercmds,
    prunecmds,
    registercmds,
    replicationcmds,
    vaultcmds,
    verifycmds,
)
from siterecovery.daemon import (
    PROCSERVER_FILES,
    StopSignals,
    listen_address,
    port_number,
    require_files,
    run_until_signal,
    settled,
    site_port_number,
)
from siterecovery.datadir import default_data_dir
from siterecovery.demo import demo
from siterecovery.embedded import add_serve_vault_args, serve, vault_choice
from siterecovery.errors import exit_code
from siterecovery.logs import FORMATS, configure, wants_json
from siterecovery.tomlconfig import load


async def cmd_serve(args: argparse.Namespace) -> int:
    return await serve(args.data_dir, args.admin_port, args.listen, args.metrics_port,
                       args.site_port, vault_choice(args))


async def cmd_configserver_run(args: argparse.Namespace) -> int:
    from configserver.server import ConfigServer  # only the daemons import the servers

    return await run_until_signal(ConfigServer(load(ConfigServerConfig, args.config)))


async def cmd_procserver_run(args: argparse.Namespace) -> int:
    cfg = load(ProcServerConfig, args.config)
    require_files(cfg, args.config, PROCSERVER_FILES)  # missing: exit 2, not 4 or 1
    from procserver.server import ProcServer  # only the daemons import the servers

    ps = ProcServer(cfg)
    signals = StopSignals()  # before the start: a stop during it is graceful too
    await ps.start()
    settled()
    try:  # a crashed part of the daemon raises TaskCrashedError: exit 1, loudly
        await ps.serve_until(signals.wait())
    finally:
        await ps.stop()
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    return await demo(args.dir, args.size_mib, args.cycles)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="siterecovery",
        description="Self-hosted disaster-recovery replication: protect Linux machines' disks "
                    "into an encrypted vault, restore any recovery point byte for byte.")
    p.add_argument("--version", action="version", version=f"siterecovery {__version__}")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"],
                   help="log level of the events on stdout (daemons default to info)")
    p.add_argument("--log-format", choices=FORMATS,
                   default=os.environ.get("SITERECOVERY_LOG_FORMAT", "auto"),
                   help="events as JSON lines or as human-readable lines; auto (default, or "
                        "$SITERECOVERY_LOG_FORMAT): readable on a terminal, JSON otherwise "
                        "(journald, pipes, files)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run configuration + process server on embedded defaults",
                       description="Run the all-in-one installation: SQLite catalog, local-folder "
                                   "vault (or --vault azure://...), admin API on loopback, "
                                   "replication on port 9443. Creates the vault, key file, CA "
                                   "and tokens on first start.")
    s.add_argument("--data-dir", default=default_data_dir(),
                   help="where everything lives (default: %(default)s)")
    s.add_argument("--admin-port", type=port_number, default=9440,
                   help="admin API port on 127.0.0.1")
    s.add_argument("--site-port", type=site_port_number, default=9441,
                   help="enrollment/agent API port (TLS), on the --listen host")
    s.add_argument("--listen", type=listen_address, default="127.0.0.1:9443",
                   help="replication listener HOST:PORT (default: %(default)s)")
    s.add_argument("--metrics-port", type=port_number, default=9444,
                   help="process-server metrics port")
    add_serve_vault_args(s)  # --vault (default: the local folder), --key-file, passphrase
    s.set_defaults(func=cmd_serve, daemon=True)

    for name, func, what in (("configserver", cmd_configserver_run, "configuration server"),
                             ("procserver", cmd_procserver_run, "process server")):
        dp = sub.add_parser(name, help=f"the {what} daemon")
        dsub = dp.add_subparsers(dest=f"{name}_cmd", required=True)
        run = dsub.add_parser("run", help=f"run the {what} (the systemd service)")
        run.add_argument("--config", required=True, help=f"TOML config (see deploy/{name}.toml)")
        run.set_defaults(func=func, daemon=True)
        if name == "procserver":
            procservercmds.register_under(dsub)  # procserver list|show|refresh

    agentcmds.register(sub)
    agentbundlecmds.register(sub)  # agent bundle
    vsub = vaultcmds.register(sub)
    registercmds.register_under(vsub)  # vault registration-key
    keycmds.register_under(vsub)  # vault key ...
    migratecmds.register_under(vsub)  # vault migrate
    checkcmds.register(sub)
    prunecmds.register(sub)
    for m in (registercmds, certcmds, policycmds, machinecmds, accountcmds, procservercmds):
        m.register(sub)
    plancmds.register_under(replicationcmds.register(sub))  # jobs resume
    for m in (failovercmds, notifycmds, verifycmds, instantcmds, plancmds, groupcmds):
        m.register(sub)

    d = sub.add_parser("demo", help="protect a sample disk end to end and prove the restore",
                       description="Make a sample disk image, protect it through TLS, the cache "
                                   "and a vault, change it over a few cycles, restore every point "
                                   "and compare byte for byte. Exits non-zero on any difference.")
    d.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    d.add_argument("--size-mib", type=int, default=64, help="sample disk size (default: 64)")
    d.add_argument("--cycles", type=int, default=3, help="delta cycles after the initial copy")
    d.set_defaults(func=cmd_demo)
    return p


def _run(func: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    coro: Any = func(args)
    if getattr(args, "daemon", False):
        return int(uvloop.run(coro))
    return int(asyncio.run(coro))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level if args.log_level != "warning" or not getattr(args, "daemon", False) \
        else "info"
    if args.log_format not in FORMATS:
        parser.error(f"--log-format: {args.log_format!r} is not one of {', '.join(FORMATS)} "
                     "(check $SITERECOVERY_LOG_FORMAT)")
    configure(level, json=wants_json(args.log_format))
    try:
        return _run(args.func, args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise  # a bug: its traceback says more than a message would
        print(f"error: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
