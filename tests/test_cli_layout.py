"""The CLI's shape (siterecovery/ is a thin composition root): verb modules share leaf
helpers instead of importing one another, every import runs at module level but the
servers' (imported by the verbs that run them, so no other verb pays for them), and
nothing reads argparse's private attributes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from siterecovery.cli import build_parser

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
    but the servers' in the verbs that start them."""
    bad = [f"{name}.py:{n.lineno} in {fn.name}" for name, tree in _trees().items()
           for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
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
