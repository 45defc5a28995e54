"""``siterecovery``: one command for the daemons and the admin verbs.

The composition root: it builds the parser from the verb modules, runs the verb, and
turns what the verb raised into ``error: ...`` and an exit code (siterecovery/errors.py:
0 success, 1 failure, 2 bad usage or configuration, 3 the vault holds damaged data, 4 the
key does not open the vault).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from siterecovery import __version__
from siterecovery.errors import exit_code
from siterecovery.logs import FORMATS, configure, wants_json

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


async def cmd_serve(args: argparse.Namespace) -> int:
    from siterecovery.embedded import serve, vault_choice

    return await serve(args.data_dir, args.admin_port, args.listen, args.metrics_port,
                       args.site_port, vault_choice(args))


async def cmd_configserver_run(args: argparse.Namespace) -> int:
    from configserver.config import ConfigServerConfig
    from configserver.server import ConfigServer  # only the daemons import the servers
    from siterecovery.daemon import run_until_signal
    from siterecovery.tomlconfig import load

    return await run_until_signal(ConfigServer(load(ConfigServerConfig, args.config)))


async def cmd_procserver_run(args: argparse.Namespace) -> int:
    from procserver.config import ProcServerConfig
    from siterecovery.daemon import PROCSERVER_FILES, StopSignals, require_files, settled
    from siterecovery.tomlconfig import load

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
    from siterecovery.demo import demo

    return await demo(args.dir, args.size_mib, args.cycles)


# -- the commands, each group of them defined by its own modules -------------------------
# A run imports only the modules of the command it runs (``siterecovery jobs list`` loads
# neither the vault nor the agent); the others are listed by name and help alone.
# tests/test_cli_commands.py holds this table to what the modules define.

def _daemons(sub: SubParsers) -> None:
    from siterecovery import procservercmds
    from siterecovery.daemon import listen_address, port_number, site_port_number
    from siterecovery.datadir import default_data_dir
    from siterecovery.embedded import add_serve_vault_args

    s = sub.add_parser("serve", help=HELP["serve"],
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
        dp = sub.add_parser(name, help=HELP[name])
        dsub = dp.add_subparsers(dest=f"{name}_cmd", required=True)
        run = dsub.add_parser("run", help=f"run the {what} (the systemd service)")
        run.add_argument("--config", required=True, help=f"TOML config (see deploy/{name}.toml)")
        run.set_defaults(func=func, daemon=True)
        if name == "procserver":
            procservercmds.register_under(dsub)  # procserver list|show|refresh


def _vault(sub: SubParsers) -> None:
    from siterecovery import keycmds, migratecmds, registercmds, vaultcmds

    vsub = vaultcmds.register(sub)
    registercmds.register_under(vsub)  # vault registration-key
    keycmds.register_under(vsub)  # vault key ...
    migratecmds.register_under(vsub)  # vault migrate


def _replication(sub: SubParsers) -> None:
    from siterecovery import plancmds, replicationcmds

    plancmds.register_under(replicationcmds.register(sub))  # jobs resume


def _demo(sub: SubParsers) -> None:
    d = sub.add_parser("demo", help=HELP["demo"],
                       description="Make a sample disk image, protect it through TLS, the cache "
                                   "and a vault, change it over a few cycles, restore every point "
                                   "and compare byte for byte. Exits non-zero on any difference.")
    d.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    d.add_argument("--size-mib", type=int, default=64, help="sample disk size (default: 64)")
    d.add_argument("--cycles", type=int, default=3, help="delta cycles after the initial copy")
    d.set_defaults(func=cmd_demo)


def _module(name: str) -> Callable[[SubParsers], None]:
    """The commands one module defines (its ``register``)."""
    def load(sub: SubParsers) -> None:
        importlib.import_module(f"siterecovery.{name}").register(sub)
    return load


#: (the commands, in the order ``--help`` lists them; what adds them to the parser)
GROUPS: list[tuple[tuple[str, ...], Callable[[SubParsers], None]]] = [
    (("serve", "configserver", "procserver"), _daemons),
    (("mobility",), _module("agentcmds")),
    (("agent",), _module("agentbundlecmds")),
    (("vault", "points", "machines", "restore"), _vault),
    (("check", "rebuild-index"), _module("checkcmds")),
    (("prune", "unlock"), _module("prunecmds")),
    (("register",), _module("registercmds")),
    (("cert",), _module("certcmds")),
    (("policy",), _module("policycmds")),
    (("machine",), _module("machinecmds")),
    (("account",), _module("accountcmds")),
    (("alerts", "events"), _module("procservercmds")),
    (("replication", "items", "jobs"), _replication),
    (("failover",), _module("failovercmds")),
    (("notify",), _module("notifycmds")),
    (("verify",), _module("verifycmds")),
    (("instant",), _module("instantcmds")),
    (("plan",), _module("plancmds")),
    (("group",), _module("groupcmds")),
    (("demo",), _demo),
]

#: each command's line in ``siterecovery --help``
HELP = {
    "serve": "run configuration + process server on embedded defaults",
    "configserver": "the configuration server daemon",
    "procserver": "the process server daemon",
    "mobility": "the Mobility agent on a protected machine",
    "agent": "the Mobility agent as a deliverable",
    "vault": "create and manage vaults",
    "points": "recovery points",
    "machines": "protected machines",
    "restore": "materialize a recovery point to raw disk images or fixed VHDs",
    "check": "verify a vault: structure, and with --read-data every block",
    "rebuild-index": "rebuild the vault's index from the packs' trailers",
    "prune": "forget points past retention and collect garbage",
    "unlock": "list or remove vault locks",
    "register": "register the configuration server with a vault",
    "cert": "certificates the configuration server's CA issued",
    "policy": "replication policies: RPO threshold, retention, consistency points, block size",
    "machine": "the machines that can be protected",
    "account": "push-install accounts (SSH user + password or key)",
    "alerts": "process-server and RPO alerts",
    "events": "the configuration server's event log",
    "replication": "enable or disable replication of a machine",
    "items": "replicated items: state, health, progress, RPO",
    "jobs": "durable jobs and their steps: list, show, wait, cancel",
    "failover": "drills (test failover), failover, commit; recovery settings",
    "notify": "alert notification channels (webhook, email)",
    "verify": "prove recovery points restore (verification jobs)",
    "instant": "instant recovery: serve a recovery point's disk over NBD straight from the "
               "vault",
    "plan": "recovery plans: ordered groups of items recovered together, with scripts and "
            "manual actions",
    "group": "multi-VM consistency groups: points of several machines taken at one "
             "coordinated moment",
    "demo": "protect a sample disk end to end and prove the restore",
}

_TOP_OPTIONS_WITH_VALUE = ("--log-level", "--log-format")


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs (its first word that is not a top-level option or an
    option's value), or None (``--help``, ``--version``, nothing)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word.startswith("--") and "=" not in word and len(word) > 2 and any(
                o.startswith(word) for o in _TOP_OPTIONS_WITH_VALUE):  # argparse's prefixes
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None, *, everything: bool = True
                 ) -> argparse.ArgumentParser:
    """The parser: with every command's arguments (``everything``), or those of
    ``command`` alone and the others by name and help (what a run needs)."""
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
    for names, load in GROUPS:
        if everything or command in names:
            load(sub)
        else:
            for name in names:
                sub.add_parser(name, help=HELP[name])
    return p


def _run(func: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    coro: Any = func(args)
    if getattr(args, "daemon", False):
        import uvloop

        return int(uvloop.run(coro))
    return int(asyncio.run(coro))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_of(argv), everything=False)
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
