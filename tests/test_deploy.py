"""Deployment artefacts: the sample configs in deploy/, the systemd units in systemd/,
and how the real CLI refuses bad config files (invariant 8: clear error, nothing changed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from configserver.config import ConfigServerConfig
from mobility.config import MobilityConfig
from procserver.config import ProcServerConfig
from siterecovery.cli import build_parser
from siterecovery.tomlconfig import load

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SYSTEMD = REPO / "systemd"

# Where deploy installs the console script; every unit's ExecStart= uses it.
INSTALLED = "/opt/siterecovery/.venv/bin/siterecovery"

CONFIG_CLASSES: dict[str, type[Any]] = {
    "configserver": ConfigServerConfig,
    "procserver": ProcServerConfig,
    "mobility": MobilityConfig,
}
# unit file -> (daemon whose sample config it runs, or None for `serve`; its User=)
UNITS: dict[str, tuple[str | None, str]] = {
    "siterecovery-configserver.service": ("configserver", "siterecovery"),
    "siterecovery-procserver.service": ("procserver", "siterecovery"),
    "siterecovery-mobility.service": ("mobility", "root"),
    "siterecovery-mobility@.service": ("mobility", "root"),  # one per machine: %i
    "siterecovery.service": (None, "siterecovery"),
}
# The directory each daemon must be able to write, by config key.
STATE_KEY = {"configserver": "data_dir", "procserver": "data_dir", "mobility": "state_dir"}


# -- helpers -----------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{n}: keep directives on one line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{n}: not a directive: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= expected once, found {values}"
    return values[0]


def writable_dirs(service: dict[str, list[str]]) -> list[Path]:
    dirs = [Path(p.lstrip("-")) for v in service.get("ReadWritePaths", []) for p in v.split()]
    dirs += [Path("/var/lib") / d for v in service.get("StateDirectory", []) for d in v.split()]
    return dirs


def is_under(path: Path, dirs: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in dirs)


def toml_text(doc: dict[str, Any]) -> str:
    """A flat TOML document (strings, numbers, lists of strings or of flat tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(type(v))

    return "".join(f"{k} = {value(v)}\n" for k, v in doc.items())


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- 1. the sample configs ------------------------------------------------------------


@pytest.mark.parametrize("daemon", sorted(CONFIG_CLASSES))
def test_sample_config_loads_and_documents_every_key(daemon: str) -> None:
    cls = CONFIG_CLASSES[daemon]
    path = DEPLOY / f"{daemon}.toml"
    cfg = load(cls, path)
    assert isinstance(cfg, cls)
    with open(path, "rb") as fp:
        doc = tomllib.load(fp)
    fields = {fld.name: fld for fld in dataclasses.fields(cls)}
    assert sorted(doc) == sorted(fields), "the sample must list every key, and only those"
    # The samples say "listed with its default value": keep them true when a default changes.
    for name, fld in fields.items():
        if fld.default is not dataclasses.MISSING:
            assert doc[name] == fld.default, f"{path.name}: {name} is not {fld.default!r}"
        elif fld.default_factory is not dataclasses.MISSING:
            assert doc[name] == fld.default_factory(), f"{path.name}: {name} is not the default"


# -- 2. the systemd units ---------------------------------------------------------------


def test_every_unit_is_tested() -> None:
    assert sorted(p.name for p in SYSTEMD.glob("*.service")) == sorted(UNITS)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_settings(name: str) -> None:
    path = SYSTEMD / name
    unit = parse_unit(path)
    daemon, user = UNITS[name]
    svc = unit["Service"]
    exec_start = one(unit, "Service", "ExecStart")
    assert exec_start.split()[0] == INSTALLED
    header = path.read_text().split("[Unit]", 1)[0]
    assert INSTALLED in header, "the header comment must say where deploy installs the script"
    assert one(unit, "Service", "Type") in ("exec", "simple")
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "TimeoutStopSec")
    assert one(unit, "Service", "User") == user
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert svc.get("StateDirectory"), "the data directory comes from StateDirectory="
    if user == "root":
        # The agent reads block devices and runs fsfreeze: keep /dev and CAP_SYS_ADMIN.
        assert svc.get("PrivateDevices", ["no"]) == ["no"]
        assert "CAP_SYS_ADMIN" in one(unit, "Service", "CapabilityBoundingSet").split()
        assert "block-* r" in svc.get("DeviceAllow", [])
        # ProtectHome=yes would hide image files and mounts under /home.
        assert one(unit, "Service", "ProtectHome") == "read-only"
    else:
        assert one(unit, "Service", "CapabilityBoundingSet") == ""
        assert one(unit, "Service", "ProtectHome") == "yes"
        assert one(unit, "Service", "PrivateDevices") == "yes"
    if daemon in (None, "procserver"):
        assert int(one(unit, "Service", "LimitNOFILE")) >= 4096


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_command_line_and_paths_match_the_cli_and_sample(name: str) -> None:
    unit = parse_unit(SYSTEMD / name)
    daemon, _user = UNITS[name]
    argv = one(unit, "Service", "ExecStart").split()
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit 2) on a bad command line
    writable = writable_dirs(unit["Service"])
    if daemon is None:
        assert argv[1] == "serve"
        assert is_under(Path(args.data_dir), writable)
        return
    assert argv[1:4] == [daemon, "run", "--config"]
    want = "cmd_run" if daemon == "mobility" else f"cmd_{daemon}_run"
    assert args.func.__name__ == want
    cfg = load(CONFIG_CLASSES[daemon], DEPLOY / f"{daemon}.toml")
    state = Path(getattr(cfg, STATE_KEY[daemon]))
    if name.endswith("@.service"):  # an instance per machine: its config and state
        assert args.config == f"/etc/siterecovery/{daemon}/%i.toml"
        for d in (state / "%i", Path("/run/siterecovery-mobility/%i")):
            assert is_under(d, writable + [Path("/run") / r for v in unit["Service"].get(
                "RuntimeDirectory", []) for r in v.split()]), d
            header = (SYSTEMD / name).read_text().split("[Unit]")[0]
            assert str(d).replace("%i", "NAME") in header, \
                f"the header must tell to set {d} in each instance's config"
        return
    assert args.config == f"/etc/siterecovery/{daemon}.toml"
    assert is_under(state, writable), f"{state} is read-only under ProtectSystem=strict"
    if daemon == "procserver":
        assert cfg.vault_url.startswith("file://")
        assert is_under(Path(cfg.vault_url.removeprefix("file://")), writable)


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: CI must install it (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install -y systemd)")
    return exe


def units_for_verify(dest: Path) -> Path:
    """Copy every unit into ``dest`` with ExecStart pointing at a binary that exists here.

    ``systemd-analyze verify`` refuses a unit whose ExecStart binary does not exist,
    and /opt/siterecovery is only there on a deployed machine. The copies run the
    console script of the environment under test instead; nothing else changes. All
    units go into one directory so that references between them (Conflicts=) resolve.
    """
    script = Path(sys.executable).parent / "siterecovery"
    assert os.access(script, os.X_OK), f"{script} is missing: install the project first"
    dest.mkdir()
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert f"ExecStart={INSTALLED} " in text
        (dest / name).write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={script} "))
        if name.endswith("@.service"):  # verified as an instance of it
            (dest / name.replace("@.", "@vm01.")).write_text((dest / name).read_text())
    return dest


def verify_problems(exe: str, unit: Path) -> list[str]:
    """Run ``systemd-analyze verify``; return what it said about ``unit`` (empty: clean).

    verify exits 0 even for unknown directives (it only warns), so stderr is checked:
    every line that names the unit counts, and so does the exit status.
    """
    r = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    problems = [line for line in (r.stderr + r.stdout).splitlines()
                if unit.name in line or str(unit.parent) in line
                or "Unknown key" in line or "Unknown section" in line]
    if r.returncode != 0:
        problems.append(f"exit status {r.returncode}: {r.stderr.strip()}")
    return problems


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    exe = systemd_analyze()
    units = units_for_verify(tmp_path / "units")
    assert verify_problems(exe, units / name.replace("@.", "@vm01.")) == []


@pytest.mark.parametrize(("change", "expect"), [
    (("Restart=on-failure", "Restart=on-failure\nRestartOnFailure=yes"), "Unknown key"),
    (("[Service]", "[Servce]"), "Unknown section"),
    (("NoNewPrivileges=yes", "NoNewPrivileges=maybe"), "Failed to parse boolean"),
    ((None, None), "not executable"),
])
def test_verify_check_catches_mistakes(change: tuple[str | None, str | None], expect: str,
                                       tmp_path: Path) -> None:
    """The verify check above is not a rubber stamp: known mistakes are reported."""
    exe = systemd_analyze()
    units = units_for_verify(tmp_path / "units")
    unit = units / "siterecovery-procserver.service"
    old, new = change
    if old is None or new is None:  # the unmodified unit, ExecStart at the deployed path
        shutil.copy(SYSTEMD / unit.name, unit)
    else:
        text = unit.read_text()
        assert old in text
        unit.write_text(text.replace(old, new, 1))
    problems = verify_problems(exe, unit)
    assert any(expect in p for p in problems), problems


# -- 3. bad config files through the real CLI ---------------------------------------------


def good_docs(tmp: Path) -> dict[str, dict[str, Any]]:
    """A valid config per daemon, every path inside ``tmp / "data"`` (which does not exist)."""
    data = tmp / "data"
    return {
        "configserver": {"data_dir": str(data / "configserver"), "listen_port": 0},
        "procserver": {
            "data_dir": str(data / "procserver"), "vault_url": f"file://{data / 'vault'}",
            "vault_key_file": str(data / "vault.key"), "tls_cert": str(data / "server.pem"),
            "tls_key": str(data / "server.key"), "tls_ca": str(data / "ca.pem"),
            "listen_port": 0, "metrics_port": 0,
        },
        "mobility": {
            "machine": "web01", "server_host": "127.0.0.1", "tls_ca": str(data / "ca.pem"),
            "tls_cert": str(data / "agent.pem"), "tls_key": str(data / "agent.key"),
            "state_dir": str(data / "state"),
            "disks": [{"name": "sda", "path": str(data / "sda.img")}],
        },
    }


# (daemon, what to do to the good config, substrings the error must contain besides the path)
BAD_CONFIGS: list[tuple[str, str, Any, list[str]]] = [
    ("procserver", "set", {"colour": "blue"}, ["unknown key", "colour"]),
    ("configserver", "set", {"listen_addr": "127.0.0.1"}, ["unknown key", "listen_addr"]),
    ("procserver", "set", {"listen_port": "9443"}, ["'listen_port'", "must be int", "not str"]),
    ("mobility", "set", {"disks": "/dev/sda"}, ["'disks'", "must be", "not str"]),
    ("procserver", "set", {"cache_quota_bytes": 1.5e9},
     ["'cache_quota_bytes'", "must be int", "not float"]),
    ("procserver", "drop", "vault_key_file", ["required key 'vault_key_file' is missing"]),
    ("mobility", "drop", "machine", ["required key 'machine' is missing"]),
    ("configserver", "drop", "data_dir", ["required key 'data_dir' is missing"]),
    ("configserver", "set", {"listen_host": "0.0.0.0"}, ["loopback", "listen_host"]),
    ("configserver", "set", {"listen_host": "192.0.2.1"}, ["loopback", "listen_host"]),
    ("configserver", "set", {"listen_port": 70000}, ["listen_port"]),
    ("procserver", "set", {"segment_bytes": 4096}, ["segment_bytes", "1 MiB"]),
    ("procserver", "set", {"cache_quota_bytes": 1 << 20}, ["cache_quota_bytes", "segments"]),
    ("procserver", "set", {"idle_timeout_seconds": 0}, ["idle_timeout_seconds"]),
    ("mobility", "set", {"block_size": 1000}, ["block_size", "power of two"]),
    ("mobility", "set", {"disks": []}, ["disks", "at least one"]),
    ("mobility", "set", {"disks": [{"name": "sda"}]}, ["disks", "'path'"]),
    ("mobility", "set", {"snapshot": "zfs"}, ["snapshot must be"]),
    ("mobility", "set", {"snapshot": "fsfreeze"}, ["fsfreeze", "freeze_mounts"]),
    ("procserver", "text", 'data_dir = "unterminated\n', ["not valid TOML", "line 1"]),
    ("mobility", "text", "machine = web01\n", ["not valid TOML", "line 1"]),
    ("configserver", "missing", None, ["does not exist"]),
]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "siterecovery", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=env)


@pytest.mark.parametrize(("daemon", "action", "arg", "expect"), BAD_CONFIGS,
                         ids=[f"{d}-{a}-{str(x)[:30]}" for d, a, x, _ in BAD_CONFIGS])
def test_bad_config_is_refused_and_changes_nothing(
        daemon: str, action: str, arg: Any, expect: list[str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    doc = good_docs(tmp_path)[daemon]
    cfg = work / f"{daemon}-bad.toml"
    # The good config is valid, so the one change below is what gets it refused.
    cfg.write_text(toml_text(doc))
    load(CONFIG_CLASSES[daemon], cfg)
    if action == "set":
        doc.update(arg)
        cfg.write_text(toml_text(doc))
    elif action == "drop":
        del doc[arg]
        cfg.write_text(toml_text(doc))
    elif action == "text":
        cfg.write_text(arg)
    else:
        assert action == "missing"
        cfg.unlink()
    before = tree(tmp_path)

    r = run_cli(daemon, "run", "--config", str(cfg), cwd=work)

    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("error: "), r.stderr
    assert len(err.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(cfg) in err, f"the message must name the file: {err}"
    for s in expect:
        assert s in err, f"{s!r} not in {err!r}"
    assert "_started" not in r.stdout
    assert not (tmp_path / "data").exists()
    assert tree(tmp_path) == before, "a refused config must not create anything"
