"""Package boundaries (DESIGN.md §2): who may import whom, no cycles, a lean agent.

The import graph is read from the source with ``ast`` (every ``import`` and
``from … import``, at module level or inside functions; imports under
``if TYPE_CHECKING:`` are left out, as they never run). The agent's import closure is
checked in a fresh interpreter, so what a protected machine loads is what is measured.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("common", "wire", "vault", "instant", "targets", "mobility", "procserver",
            "configserver", "siterecovery")

# package -> the packages of ours it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "wire": {"common"},
    "vault": {"common"},
    "instant": {"vault", "common"},  # the NBD server of a point: reads the vault, no server
    "mobility": {"wire", "common"},
    "targets": {"vault", "instant", "common"},
    "procserver": {"vault", "wire", "common"},
    "configserver": {"vault", "instant", "targets", "common"},
    "siterecovery": {"common", "wire", "vault", "instant", "targets", "mobility", "procserver",
                     "configserver"},
}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """First-party modules that ``module`` imports when it runs."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> None:
        # "a.b.c" may be a module or a name inside module "a.b": take the longest known.
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in known:
                found.add(candidate)
                return

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    resolve(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)] if child.level > 1 else base
                    prefix = ".".join(base)
                    mod = f"{prefix}.{child.module}" if child.module else prefix
                else:
                    mod = child.module or ""
                for alias in child.names:
                    resolve(f"{mod}.{alias.name}")
                resolve(mod)
            visit(child)

    visit(tree)
    found.discard(module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_package_imports_only_what_it_may(graph: dict[str, set[str]]) -> None:
    bad = []
    for mod, deps in sorted(graph.items()):
        pkg = mod.split(".")[0]
        for dep in sorted(deps):
            dep_pkg = dep.split(".")[0]
            if dep_pkg != pkg and dep_pkg not in ALLOWED[pkg]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "imports across a package boundary:\n" + "\n".join(bad)


def test_nothing_imports_the_cli(graph: dict[str, set[str]]) -> None:
    bad = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
           if d.split(".")[0] == "siterecovery" and m.split(".")[0] != "siterecovery"]
    assert not bad


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    """Tarjan's strongly connected components over the run-time import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    # A package's __init__ importing its own submodules is not a cycle worth naming.
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_graph_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The checker itself: a function-level import counts (so a cycle cannot hide there),
    and one under ``if TYPE_CHECKING:`` does not (it never runs)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from procserver.server import ProcServer\n"
                     "def f():\n    from vault.repo import Vault\n")
    known = {"vault.repo", "vault", "procserver.server", "procserver"}
    assert _imports("mobility.probe", probe, known) == {"vault.repo"}


FORBIDDEN_IN_AGENT = ("zstandard", "sqlalchemy", "azure", "aiohttp.web", "asyncpg", "alembic",
                      "aiosqlite", "jsonschema", "vault", "procserver", "configserver",
                      "siterecovery")


def test_the_agent_loads_no_server_stack() -> None:
    """What ``mobility run`` imports on a protected machine: not the vault's ciphers and
    compressors, no database, no HTTP server, no Azure SDK, nothing of the servers."""
    code = ("import json, sys\n"
            "import mobility.daemon, mobility.agent, mobility.snapshot\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    loaded = json.loads(out)
    bad = sorted(m for m in loaded
                 if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_AGENT))
    assert not bad, f"the agent imports server-side modules: {bad}"
    ours = {m.split(".")[0] for m in loaded} & set(PACKAGES)
    assert ours <= {"mobility", "wire", "common"}


def test_the_command_loads_no_azure_management_sdk() -> None:
    """``siterecovery mobility run`` and ``procserver run`` import the whole command; the
    Azure management SDK (0.7 s, 70 MB of models) is loaded only by a configuration
    server that has an Azure target."""
    code = ("import json, sys\n"
            "import siterecovery.cli\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    heavy = sorted(m for m in json.loads(out) if m.startswith(("azure.mgmt", "azure.identity")))
    assert not heavy, f"the command imports {heavy[:5]}"
