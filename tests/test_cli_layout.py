"""The CLI's shape (siterecovery/ is a thin composition root): verb modules share leaf
helpers instead of importing one another, every import runs at module level but the
servers' (imported by the verbs that run them, so no other verb pays for them) and
cli.py's (which loads the modules of the command it runs, and no other), and nothing
reads argparse's private attributes."""

from __future__ import annotations

import ast
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from siterecovery.cli import GROUPS, build_parser, command_of

CLI = Path(__file__).resolve().parent.parent / "siterecovery"


def _trees() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(CLI.glob("*.py"))}


def _imported(tree: ast.AST) -> set[str]:
    """The siterecovery modules ``tree`` imports (``from siterecovery import x`` counts)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "siterecovery":
                out |= {a.name for a in node.names}
            elif node.module.startswith("siterecovery."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names
                    if a.name.startswith("siterecovery.")}
    return out


def test_no_verb_module_imports_another() -> None:
    """``*cmds`` modules meet only in cli.py; what they share is in leaf modules."""
    verbs = {name for name in _trees() if name.endswith("cmds")}
    assert {"vaultcmds", "keycmds", "registercmds"} <= verbs
    bad = [f"{name} imports {other}" for name, tree in _trees().items() if name in verbs
           for other in sorted(_imported(tree) & verbs)]
    assert not bad


# Imported inside the verbs that start a server: the servers' whole import closure
# (SQLAlchemy, the web console, the job kinds, asyncssh …) is about two thirds of the
# CLI's start-up time, which every other verb would pay.
SERVERS = {"configserver.server", "procserver.server", "configserver.certs"}


def test_every_import_is_at_module_level() -> None:
    """No import hides inside a function (where a cycle or a slow import could hide),
    but the servers' in the verbs that start them, and the composition root's: cli.py
    imports the modules of the command it runs when it runs it."""
    bad = [f"{name}.py:{n.lineno} in {fn.name}" for name, tree in _trees().items()
           if name != "cli" for fn in ast.walk(tree)
           if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
           for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))
           and not (isinstance(n, ast.ImportFrom) and n.module in SERVERS)]
    assert not bad


def test_the_cli_starts_without_the_servers() -> None:
    """Parsing any verb imports neither server: they load when a daemon verb runs."""
    code = ("import sys; from siterecovery.cli import build_parser; build_parser(); "
            f"print(sorted(m for m in {sorted(SERVERS)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_no_argparse_internals_are_read() -> None:
    bad = [f"{name}.py:{n.lineno}" for name, tree in _trees().items() for n in ast.walk(tree)
           if isinstance(n, ast.Attribute) and n.attr in ("_actions", "_option_string_actions",
                                                          "_subparsers", "_defaults")]
    assert not bad


def test_vault_subcommands_come_from_three_modules() -> None:
    """``vault init`` (vaultcmds), ``vault registration-key`` (registercmds) and ``vault
    key`` (keycmds) are wired by cli.py under one ``vault`` command."""
    args = build_parser().parse_args(["vault", "key", "list", "--data-dir", "/nonexistent"])
    assert args.func.__module__ == "siterecovery.keycmds"
    args = build_parser().parse_args(["vault", "registration-key", "--out", "x",
                                      "--data-dir", "/nonexistent"])
    assert args.func.__module__ == "siterecovery.registercmds"
    args = build_parser().parse_args(["vault", "init", "--data-dir", "/nonexistent"])
    assert args.func.__module__ == "siterecovery.vaultcmds"


def _help(argv: list[str], *, everything: bool) -> str:
    """What ``siterecovery ARGV`` prints for its help, from the whole parser or from the
    one a run builds (the command's own modules, the others by name)."""
    parser = build_parser(command_of(argv), everything=everything)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(argv)
    return out.getvalue()


def test_a_run_builds_the_parser_the_whole_one_is() -> None:
    """The commands' table in cli.py (their names, order and help) is what the modules
    define: every help a run prints is the whole parser's."""
    assert _help(["--help"], everything=False) == _help(["--help"], everything=True)
    for name in [n for names, _load in GROUPS for n in names]:
        for argv in ([name, "--help"], ["--log-level", "debug", name, "--help"],
                     ["--log-l", "debug", name, "--help"], ["--log-level=info", name, "-h"]):
            assert _help(argv, everything=False) == _help(argv, everything=True), argv


HEAVY = ("vault.repo", "vault.crypto", "mobility.agent", "procserver.config",
         "configserver.config", "aiohttp", "prometheus_client")


def _loaded(argv: list[str]) -> list[str]:
    code = ("import sys\nfrom siterecovery.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('siterecovery.') or m in "
            f"{HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         check=True).stdout
    return list(ast.literal_eval(out.strip().splitlines()[-1]))


def test_a_command_loads_its_own_modules_and_no_others() -> None:
    top = _loaded(["--help"])
    assert not [m for m in top if m.endswith("cmds") or m in HEAVY], top
    jobs = _loaded(["jobs", "list", "--help"])
    assert {"siterecovery.replicationcmds", "siterecovery.plancmds"} <= set(jobs)
    assert not {m for m in jobs if m.endswith("cmds")} - {"siterecovery.replicationcmds",
                                                          "siterecovery.plancmds"}, jobs
    assert not {"vault.repo", "mobility.agent", "procserver.config"} & set(jobs), jobs
    assert "siterecovery.vaultcmds" in _loaded(["vault", "init", "--help"])
