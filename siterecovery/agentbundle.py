"""Build the agent bundle: the Mobility agent and nothing else, installable offline.

The bundle is a ``.tar.gz`` holding one directory ``siterecovery-agent-VERSION/``::

    agent.py                 the entry: puts lib/ and vendor/ first on sys.path, runs
                             mobility.standalone.main
    lib/                     our modules the agent imports (mobility/, wire/, common/),
                             only those in the import closure of mobility.standalone
    vendor/                  the third-party distributions that closure needs, copied
                             whole from this build machine's environment (compiled
                             extensions included: see "Target" below)
    bin/siterecovery-agent   launcher: the chosen interpreter with -I -S, so nothing of
                             the target's own site-packages is loaded
    siterecovery-agent.service   the systemd unit (the hardening of
                             systemd/siterecovery-mobility.service, ExecStart on the
                             launcher)
    install.sh, uninstall.sh the install script (checks the interpreter first) and the
                             removal of exactly what it installed
    MANIFEST.json            version, the target it needs, distributions, sha256 of
                             every file

Target: the vendored wheels are the build machine's. Extensions built for one CPython
minor version (``*.cpython-311-*.so``: xxhash, blake3, cffi, aiohttp, multidict …)
load only on that version, so a bundle built on CPython 3.11 needs CPython 3.11 on the
target, the same architecture, and a glibc at least the newest manylinux tag among the
wheels. ``support_statement`` checks that against the support matrix.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import io
import json
import os
import platform
import re
import sys
import sysconfig
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from configserver.support import DISTRIBUTIONS
from mobility import AGENT_VERSION

REPO = Path(__file__).resolve().parents[1]
OURS = ("mobility", "wire", "common")
ENTRY = "mobility.standalone"
UNIT_SOURCE = REPO / "systemd" / "siterecovery-mobility.service"
INSTALL_SH = REPO / "deploy" / "agent-install.sh"
UNINSTALL_SH = REPO / "deploy" / "agent-uninstall.sh"
DEFAULT_PREFIX = "/opt/siterecovery-agent"


class BundleError(Exception):
    """The bundle cannot be built from this environment; ``str(e)`` says why."""


# The CPython each release of the support matrix can run the agent with, from its own
# archive: (version of python3, a CPython packaged besides it or "", how to install it).
# Checked against the bundle's interpreter by ``support_statement``.
SYSTEM_PYTHONS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("ubuntu", "20.04"): ("3.8", "", ""),
    ("ubuntu", "22.04"): ("3.10", "3.11", "apt-get install python3.11"),
    ("ubuntu", "24.04"): ("3.12", "", ""),
    ("debian", "11"): ("3.9", "", ""),
    ("debian", "12"): ("3.11", "", ""),
    ("debian", "13"): ("3.13", "", ""),
    **{(d, "8"): ("3.6", "3.11", "dnf install python3.11")
       for d in ("rhel", "rocky", "almalinux", "centos", "ol")},
    **{(d, "9"): ("3.9", "3.11", "dnf install python3.11")
       for d in ("rhel", "rocky", "almalinux", "centos", "ol")},
}
# glibc of each release (ldd --version), for the manylinux tags of the vendored wheels.
SYSTEM_GLIBC: dict[str, tuple[int, int]] = {
    "ubuntu 20.04": (2, 31), "ubuntu 22.04": (2, 35), "ubuntu 24.04": (2, 39),
    "debian 11": (2, 31), "debian 12": (2, 36), "debian 13": (2, 41),
    **{f"{d} 8": (2, 28) for d in ("rhel", "rocky", "almalinux", "centos", "ol")},
    **{f"{d} 9": (2, 34) for d in ("rhel", "rocky", "almalinux", "centos", "ol")},
}


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_of(name: str, path: Path) -> set[str]:
    """Absolute names imported by the module (relative imports resolved), at any depth
    except under ``if TYPE_CHECKING:`` (never run)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - child.level + 1]
                    mod = ".".join([*base, mod] if mod else base)
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return out


def agent_closure() -> tuple[dict[str, Path], set[str]]:
    """Our modules reachable from ``mobility.standalone`` (name → file; each package's
    ``__init__`` included) and the top-level third-party names they import."""
    ours: dict[str, Path] = {}
    third: set[str] = set()
    todo = [ENTRY]
    while todo:
        name = todo.pop()
        if name in ours:
            continue
        path = _module_file(name)
        if path is None:
            continue  # "pkg.mod.Name": the module is queued on its own
        ours[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        for imported in _imports_of(name, path):
            top = imported.split(".")[0]
            if top in OURS:
                todo.append(imported)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    bad = {n.split(".")[0] for n in ours} - set(OURS)
    if bad:
        raise BundleError(f"the agent imports {sorted(bad)}, outside {OURS}")
    return ours, third


def _dist_closure(tops: set[str]) -> list[str]:
    """Distributions providing ``tops`` and, recursively, their requirements whose
    markers hold on this interpreter (no extras)."""
    providers = md.packages_distributions()
    todo: list[str] = []
    for top in sorted(tops):
        names = providers.get(top)
        if not names:
            raise BundleError(f"no installed distribution provides {top!r}")
        todo.extend(names)
    seen: dict[str, str] = {}
    while todo:
        name = todo.pop()
        dist = md.distribution(name)
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in seen:
            continue
        seen[key] = dist.metadata["Name"]
        for spec in dist.requires or ():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sorted(seen.values(), key=str.lower)


_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_")
_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def _glibc_of(dist: md.Distribution) -> tuple[int, int] | None:
    """The oldest glibc the wheel's tags accept (None: a pure-Python wheel)."""
    text = dist.read_text("WHEEL") or ""
    found: list[tuple[int, int]] = []
    for tag in re.findall(r"^Tag:\s*(\S+)", text, re.M):
        plat = tag.split("-")[-1]
        for one in plat.split("."):
            m = _MANYLINUX.match(one + "_")
            if m:
                found.append((int(m[1]), int(m[2])))
            for legacy, ver in _LEGACY.items():
                if one.startswith(legacy + "_"):
                    found.append(ver)
    return min(found) if found else None


def _target(dists: list[str]) -> dict[str, Any]:
    """What the vendored files need of the target interpreter and system."""
    per_version, abi3, glibc = [], [], (0, 0)
    for name in dists:
        dist = md.distribution(name)
        sos = [str(f) for f in dist.files or () if str(f).endswith(".so")]
        if any(".cpython-" in s for s in sos):
            per_version.append(name)
        elif sos:
            abi3.append(name)
        g = _glibc_of(dist)
        if sos and g is not None:
            glibc = max(glibc, g)
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {"implementation": sys.implementation.name,
            "python": minor if per_version else ">=3.11",
            "python_exact": bool(per_version),
            "machine": platform.machine(),
            "platform": sysconfig.get_platform(),
            "glibc": f"{glibc[0]}.{glibc[1]}" if glibc != (0, 0) else "",
            "compiled_for_this_python": per_version,
            "compiled_abi3": abi3}


def support_statement(target: dict[str, Any]) -> list[dict[str, Any]]:
    """For each release of the support matrix: can this bundle run there, and how."""
    need = target["python"]
    glibc_need = tuple(int(x) for x in target["glibc"].split(".")) if target["glibc"] else ()
    out = []
    for dist in DISTRIBUTIONS:
        for rel in dist.releases:
            system, extra, how = SYSTEM_PYTHONS[(dist.os_name, rel.version)]
            name = f"{dist.os_name} {rel.version}"
            old_glibc = bool(glibc_need) and SYSTEM_GLIBC[name] < glibc_need
            if old_glibc:
                runs, note = False, f"glibc {'.'.join(map(str, SYSTEM_GLIBC[name]))} is " \
                                    f"older than the wheels' {target['glibc']}"
            elif system == need or (not target["python_exact"] and _ge(system, "3.11")):
                runs, note = True, f"python3 is {system}"
            elif extra == need:
                runs, note = True, f"needs its python{extra} package: {how}"
            else:
                runs, note = False, (f"python3 is {system} and no CPython {need} is packaged: "
                                     f"build the bundle on {dist.display} {rel.version}")
            out.append({"os": name, "runs": runs, "note": note})
    return out


def _ge(a: str, b: str) -> bool:
    return tuple(map(int, a.split("."))) >= tuple(map(int, b.split(".")))


def _unit(prefix: str) -> str:
    text = UNIT_SOURCE.read_text()
    start = f"ExecStart={prefix}/bin/siterecovery-agent run --config " \
            "/etc/siterecovery/mobility.toml"
    text, n = re.subn(r"^ExecStart=.*$", start, text, count=1, flags=re.M)
    if n != 1:
        raise BundleError(f"{UNIT_SOURCE} has no ExecStart= line")
    return "# From the agent bundle: ExecStart runs the bundle's launcher.\n" + text


LAUNCHER = """#!/bin/sh
# The agent bundle's launcher: the interpreter install.sh chose (in ../python), with -I
# (no PYTHONPATH, no user site) and -S (not the system's site-packages), so the agent
# runs on the bundle's own modules only.
here=$(dirname "$(readlink -f "$0")")/..
exec "$(cat "$here/python")" -I -S "$here/agent.py" "$@"
"""

ENTRY_PY = """import os
import sys

root = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(root, "lib"), os.path.join(root, "vendor")]
from mobility.standalone import main  # noqa: E402

sys.exit(main())
"""


def build(output: Path | None = None, *, prefix: str = DEFAULT_PREFIX) -> Bundle:
    """Write the bundle to ``output`` (default: siterecovery-agent-VERSION-PLATFORM.tar.gz
    in the current directory) and return it with its manifest. Deterministic content for
    one environment; raises ``BundleError``."""
    ours, third = agent_closure()
    dists = _dist_closure(third)
    target = _target(dists)
    top = f"siterecovery-agent-{AGENT_VERSION}"
    if output is None:
        output = Path(f"{top}-cp{sys.version_info.major}{sys.version_info.minor}-"
                      f"{target['platform']}.tar.gz")
    files: dict[str, bytes] = {}
    for path in ours.values():
        files[f"lib/{path.relative_to(REPO)}"] = path.read_bytes()
    versions = {}
    for name in dists:
        dist = md.distribution(name)
        versions[dist.metadata["Name"]] = dist.version
        for f in dist.files or ():
            rel = str(f)
            if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc"):
                continue
            files[f"vendor/{rel}"] = Path(str(dist.locate_file(f))).read_bytes()
    files["agent.py"] = ENTRY_PY.encode()
    files["bin/siterecovery-agent"] = LAUNCHER.encode()
    files["siterecovery-agent.service"] = _unit(prefix).encode()
    files["install.sh"] = INSTALL_SH.read_bytes()
    files["uninstall.sh"] = UNINSTALL_SH.read_bytes()
    manifest = {"agent_version": AGENT_VERSION, "prefix": prefix, "target": target,
                "distributions": versions,
                "support": support_statement(target),
                "files": {n: hashlib.sha256(b).hexdigest() for n, b in sorted(files.items())}}
    files["MANIFEST.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    executable = {"bin/siterecovery-agent", "install.sh", "uninstall.sh"}
    tmp = output.with_name(output.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mtime = len(data), int(time.time())
            info.mode = 0o755 if name in executable else 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, output)
    return Bundle(output, manifest)
