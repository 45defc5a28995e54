"""The agent bundle (issue #14): only the agent's closure inside, runnable with nothing but
the bundle on sys.path, installed and removed by its own scripts, refused where it cannot
run."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from mobility import AGENT_VERSION
from siterecovery.agentbundle import Bundle, build, support_statement
from siterecovery.cli import main
from tests.helpers import REPO

SERVER_SIDE = ("zstandard", "sqlalchemy", "azure", "aiohttp.web", "asyncpg", "alembic",
               "aiosqlite", "jsonschema", "uvloop", "prometheus_client", "vault", "procserver",
               "configserver", "siterecovery", "targets")
MAX_BYTES = 16_000_000  # 9 MB today, most of it cryptography's Rust extension


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build(tmp_path_factory.mktemp("bundle") / "agent.tar.gz")


@pytest.fixture
def unpacked(bundle: Bundle, tmp_path: Path) -> Path:
    with tarfile.open(bundle.path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    return tmp_path / "x" / f"siterecovery-agent-{AGENT_VERSION}"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if not p.is_dir())


def test_the_bundle_holds_only_the_agents_closure(bundle: Bundle) -> None:
    size = bundle.path.stat().st_size
    assert 1_000_000 < size < MAX_BYTES, size
    with tarfile.open(bundle.path) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames()]
    ours = {n.split("/")[1] for n in names if n.startswith("lib/")}
    assert ours == {"mobility", "wire", "common"}
    assert "lib/mobility/standalone.py" in names and "lib/wire/protocol.py" in names
    assert "lib/common/sqldb.py" not in names  # common/, but not the agent's (sqlalchemy)
    vendored = {n.split("/")[1].split("-")[0].lower() for n in names if n.startswith("vendor/")}
    assert {"aiohttp", "cryptography", "structlog", "xxhash"} <= vendored
    assert not vendored & {"sqlalchemy", "azure", "asyncpg", "alembic", "zstandard",
                           "aiosqlite", "jsonschema", "uvloop"}
    assert {"install.sh", "uninstall.sh", "siterecovery-agent.service", "MANIFEST.json",
            "bin/siterecovery-agent", "agent.py"} <= set(names)
    m = bundle.manifest
    assert m["agent_version"] == AGENT_VERSION
    assert m["target"]["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert set(m["files"]) == set(names) - {"MANIFEST.json"}


def test_the_entry_point_loads_nothing_but_the_bundle(unpacked: Path) -> None:
    """A fresh interpreter without site-packages (-I -S) and only lib/ and vendor/ on
    sys.path: importing the entry and the daemon works, loads no server-side package,
    and every module not from the standard library comes from the bundle."""
    code = ("import json, sys\n"
            f"sys.path[:0] = [{str(unpacked / 'lib')!r}, {str(unpacked / 'vendor')!r}]\n"
            "import mobility.standalone, mobility.daemon, mobility.agent, mobility.snapshot\n"
            "print(json.dumps({n: getattr(m, '__file__', None) or ''\n"
            "                  for n, m in list(sys.modules.items())}))\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, check=True, cwd=unpacked.parent).stdout
    loaded: dict[str, str] = json.loads(out)
    bad = sorted(n for n in loaded if any(n == f or n.startswith(f + ".") for f in SERVER_SIDE))
    assert not bad, f"the bundle's agent imports server-side modules: {bad}"
    outside = sorted(n for n, f in loaded.items()
                     if n.split(".")[0] not in sys.stdlib_module_names and f
                     and not f.startswith(str(unpacked)))
    assert not outside, f"loaded from outside the bundle: {outside[:10]}"
    assert "aiohttp" in loaded and "mobility.daemon" in loaded


def test_install_runs_the_agent_and_uninstall_removes_every_file(unpacked: Path,
                                                                  tmp_path: Path) -> None:
    root = tmp_path / "target"
    root.mkdir()
    r = subprocess.run([str(unpacked / "install.sh"), "--root", str(root)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    prefix = root / "opt" / "siterecovery-agent"
    assert (root / "etc/systemd/system/siterecovery-agent.service").read_text().count(
        "ExecStart=/opt/siterecovery-agent/bin/siterecovery-agent run --config "
        "/etc/siterecovery/mobility.toml") == 1
    launcher = str(prefix / "bin" / "siterecovery-agent")
    doc = json.loads(subprocess.run([launcher, "version", "--json"], capture_output=True,
                                    text=True, check=True).stdout)
    assert doc["agent_version"] == AGENT_VERSION and doc["implementation"] == "cpython"
    bad = subprocess.run([launcher, "run", "--config", str(tmp_path / "none.toml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr

    again = subprocess.run([str(unpacked / "install.sh"), "--root", str(root)],
                           capture_output=True, text=True, check=True)
    assert "already installed" in again.stdout

    subprocess.run([str(prefix / "uninstall.sh"), "--root", str(root)], check=True,
                   capture_output=True)
    assert _files(root) == []


def test_install_refuses_a_damaged_bundle_and_changes_nothing(unpacked: Path,
                                                               tmp_path: Path) -> None:
    root = tmp_path / "target"
    root.mkdir()
    victim = unpacked / "lib" / "mobility" / "agent.py"
    victim.write_text(victim.read_text() + "\n# changed\n")
    r = subprocess.run([str(unpacked / "install.sh"), "--root", str(root)],
                       capture_output=True, text=True)
    assert r.returncode == 3
    assert "damaged: lib/mobility/agent.py" in r.stderr and "hint:" in r.stderr
    assert list(root.iterdir()) == []


def test_install_refuses_a_bundle_for_another_machine(unpacked: Path, tmp_path: Path) -> None:
    root = tmp_path / "target"
    root.mkdir()
    manifest = unpacked / "MANIFEST.json"
    doc = json.loads(manifest.read_text())
    doc["target"]["machine"] = "aarch64"
    manifest.write_text(json.dumps(doc, indent=1))
    r = subprocess.run([str(unpacked / "install.sh"), "--root", str(root),
                        "--python", sys.executable], capture_output=True, text=True)
    assert r.returncode == 3 and "built for aarch64" in r.stderr
    assert list(root.iterdir()) == []


def test_the_support_matrix_says_where_a_bundle_runs() -> None:
    exact = {"python": "3.11", "python_exact": True, "glibc": "2.34"}
    rows = {s["os"]: s for s in support_statement(exact)}
    assert rows["debian 12"]["runs"] and rows["rhel 9"]["runs"]
    assert "dnf install python3.11" in rows["rhel 9"]["note"]
    assert not rows["ubuntu 24.04"]["runs"] and "3.12" in rows["ubuntu 24.04"]["note"]
    assert not rows["rhel 8"]["runs"] and "glibc 2.28" in rows["rhel 8"]["note"]
    pure = {"python": ">=3.11", "python_exact": False, "glibc": ""}
    rows = {s["os"]: s for s in support_statement(pure)}
    assert rows["ubuntu 24.04"]["runs"] and rows["debian 13"]["runs"]
    assert not rows["debian 11"]["runs"]


def test_the_agent_version_is_the_projects() -> None:
    """Heartbeats and HELLO carry AGENT_VERSION, which names the bundle: it is the
    project's version, so a release bumps both."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert project == AGENT_VERSION


def test_the_command_builds_and_reports_json(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.tar.gz"
    assert main(["agent", "bundle", "--output", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] == str(out) and doc["bytes"] == out.stat().st_size
    assert doc["agent_version"] == AGENT_VERSION and doc["files"] > 100
    assert any(s["os"] == "debian 12" for s in doc["support"])
