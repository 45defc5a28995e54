"""Issue #12 item 7: every exit code in the documented table, provoked through the real CLI.

The table in docs/REFERENCE.md is read, not copied: a code added there without a case
here fails, and so does a case whose code is not documented. Every daemon
(``configserver run``, ``procserver run``, ``mobility run``, ``serve``) is started with
bad configs and must exit 2 (the sample configs promise it) before it starts anything.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.errors import EXIT_CORRUPT, EXIT_FAIL, EXIT_KEY, EXIT_OK, EXIT_USAGE
from tests.helpers import REPO, make_pki, run_cli, write_toml

DAEMONS = ("configserver run", "procserver run", "mobility run", "serve")


def documented_codes() -> dict[int, str]:
    """The exit-code table of docs/REFERENCE.md: code → meaning."""
    text = (REPO / "docs/REFERENCE.md").read_text()
    start = text.index("Exit codes (`siterecovery/errors.py`)")
    table = text[start:].split("\n\n")[1]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", table, re.M)
    assert rows, "no exit-code table found in docs/REFERENCE.md"
    return {int(code): meaning for code, meaning in rows}


@dataclass(frozen=True)
class Site:
    """What the cases need on disk: a vault and its key, a second vault's key, a damaged
    vault, a PKI, and a config of each daemon that would start."""
    tmp: Path
    vault: str
    key: Path
    other_key: Path
    damaged: str
    procserver: dict[str, object]
    configserver: dict[str, object]
    mobility: dict[str, object]

    def toml(self, name: str, doc: dict[str, object], **changes: object) -> str:
        merged = {**doc, **changes}
        return str(write_toml(self.tmp / f"{name}.toml",
                              {k: v for k, v in merged.items() if v is not None}))


def _ok(*args: str) -> None:
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    tmp = tmp_path_factory.mktemp("exitcodes")
    vault, key = f"file://{tmp}/vault", tmp / "vault.key"
    _ok("vault", "init", "--vault", vault, "--key-file", str(key))
    other = tmp / "other.key"
    _ok("vault", "init", "--vault", f"file://{tmp}/other", "--key-file", str(other))
    damaged = tmp / "damaged"
    _ok("vault", "init", "--vault", f"file://{damaged}", "--key-file", str(tmp / "d.key"))
    config = bytearray((damaged / "config").read_bytes())
    config[-5] ^= 1  # inside the authentication tag
    (damaged / "config").write_bytes(bytes(config))
    pki = make_pki(tmp / "pki")
    cert, pkey = pki.server()
    acert, akey = pki.client("m1")
    disk = tmp / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    return Site(
        tmp=tmp, vault=vault, key=key, other_key=other, damaged=f"file://{damaged}",
        procserver={"data_dir": str(tmp / "ps"), "vault_url": vault,
                    "vault_key_file": str(key), "tls_cert": cert, "tls_key": pkey,
                    "tls_ca": pki.ca_path, "listen_port": 0, "metrics_port": 0},
        configserver={"data_dir": str(tmp / "cs"), "listen_port": 0, "site_port": -1},
        mobility={"machine": "m1", "server_host": "127.0.0.1", "server_port": 1,
                  "tls_ca": pki.ca_path, "tls_cert": acert, "tls_key": akey,
                  "state_dir": str(tmp / "agent"),
                  "disks": [{"name": "sda", "path": str(disk)}]})


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


@dataclass(frozen=True)
class Case:
    code: int
    what: str
    argv: Callable[[Site, int], list[str]]
    says: str = ""  # a fragment of what it prints (stdout or stderr)


def _no_file(s: Site) -> str:
    return str(s.tmp / "no-such-file")


def _binary(path: Path) -> str:
    """A file of bytes that are not UTF-8 text, at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xfe\x80" + bytes(range(256)))
    return str(path)


CASES = [
    Case(EXIT_OK, "vault init", lambda s, _: [
        "vault", "init", "--vault", f"file://{s.tmp}/fresh", "--key-file",
        str(s.tmp / "fresh.key")]),
    Case(EXIT_OK, "check of an intact vault", lambda s, _: [
        "check", "--vault", s.vault, "--key-file", str(s.key)]),
    # 1: failures that are nobody's typo
    Case(EXIT_FAIL, "configserver run: its port is taken", lambda s, port: [
        "configserver", "run", "--config",
        s.toml("cs-busy", s.configserver, listen_port=port)], "address already in use"),
    Case(EXIT_FAIL, "procserver run: its port is taken", lambda s, port: [
        "procserver", "run", "--config",
        s.toml("ps-busy", s.procserver, listen_port=port)], "address already in use"),
    # 2: bad usage, bad config: each daemon
    Case(EXIT_USAGE, "an unknown verb", lambda s, _: ["no-such-verb"]),
    Case(EXIT_USAGE, "configserver run: no config file", lambda s, _: [
        "configserver", "run", "--config", _no_file(s)], "does not exist"),
    Case(EXIT_USAGE, "configserver run: an invalid value", lambda s, _: [
        "configserver", "run", "--config",
        s.toml("cs-bad", s.configserver, agent_cert_days=5000)], "agent_cert_days"),
    Case(EXIT_USAGE, "configserver run: an unknown key", lambda s, _: [
        "configserver", "run", "--config", s.toml("cs-key", s.configserver, colour="red")],
        "colour"),
    Case(EXIT_USAGE, "procserver run: vault_key_file does not exist", lambda s, _: [
        "procserver", "run", "--config",
        s.toml("ps-nokey", s.procserver, vault_key_file=_no_file(s))], "vault_key_file"),
    Case(EXIT_USAGE, "procserver run: tls_cert does not exist", lambda s, _: [
        "procserver", "run", "--config",
        s.toml("ps-nocert", s.procserver, tls_cert=_no_file(s))], "tls_cert"),
    Case(EXIT_USAGE, "procserver run: a value of the wrong type", lambda s, _: [
        "procserver", "run", "--config",
        s.toml("ps-type", s.procserver, listen_port="9443")], "listen_port"),
    Case(EXIT_USAGE, "mobility run: tls_ca does not exist", lambda s, _: [
        "mobility", "run", "--config",
        s.toml("mob-noca", s.mobility, tls_ca=_no_file(s))], "tls_ca"),
    Case(EXIT_USAGE, "mobility run: a required key is missing", lambda s, _: [
        "mobility", "run", "--config", s.toml("mob-req", s.mobility, machine=None)],
        "machine"),
    Case(EXIT_USAGE, "configserver run: its admin token file is not text", lambda s, _: [
        "configserver", "run", "--config",
        s.toml("cs-token", s.configserver, data_dir=str(s.tmp / "cs-token"),
               token_file=_binary(s.tmp / "cs-token" / "binary-token"))],
        "not a token file"),
    Case(EXIT_USAGE, "a verb of the admin API: its --token-file is not text", lambda s, _: [
        "policy", "list", "--api", "http://127.0.0.1:9", "--token-file",
        _binary(s.tmp / "binary-token")], "not a token"),
    Case(EXIT_USAGE, "serve: --listen is not HOST:PORT", lambda s, _: [
        "serve", "--data-dir", str(s.tmp / "serve"), "--listen", "garbage"], "--listen"),
    Case(EXIT_USAGE, "serve: a port outside 0-65535", lambda s, _: [
        "serve", "--data-dir", str(s.tmp / "serve"), "--admin-port", "70000"],
        "--admin-port"),
    Case(EXIT_USAGE, "serve: a site port outside 0-65535", lambda s, _: [
        "serve", "--data-dir", str(s.tmp / "serve"), "--site-port", "99999"],
        "--site-port"),
    # 3: damaged data
    Case(EXIT_CORRUPT, "check of a damaged vault", lambda s, _: [
        "check", "--vault", s.damaged, "--key-file", str(s.tmp / "d.key")], "config"),
    # 4: the key does not open the vault
    Case(EXIT_KEY, "check with another vault's key", lambda s, _: [
        "check", "--vault", s.vault, "--key-file", str(s.other_key)]),
    Case(EXIT_KEY, "check with a key file that does not exist", lambda s, _: [
        "check", "--vault", s.vault, "--key-file", _no_file(s)], "does not exist"),
    Case(EXIT_KEY, "procserver run: vault_key_file opens no key slot", lambda s, _: [
        "procserver", "run", "--config",
        s.toml("ps-other", s.procserver, vault_key_file=str(s.other_key))], "key"),
]
INTERRUPTED = 130  # documented; provoked by test_a_second_signal_aborts_with_130


def test_every_documented_code_has_a_case_and_every_case_is_documented() -> None:
    documented = documented_codes()
    assert set(documented) == {c.code for c in CASES} | {INTERRUPTED}
    assert {EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_CORRUPT, EXIT_KEY} <= set(documented)
    for daemon in DAEMONS:  # bad config: exit 2, for every daemon
        assert any(c.code == EXIT_USAGE and c.what.startswith(daemon) for c in CASES), daemon


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.code}-{c.what}")
def test_exit_code(case: Case, site: Site, busy_port: int) -> None:
    r = subprocess.run([sys.executable, "-m", "siterecovery", *case.argv(site, busy_port)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == case.code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert case.says.lower() in (r.stdout + r.stderr).lower(), r.stderr[-3000:]


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (/proc SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _daemon_ready(proc: subprocess.Popen[str]) -> None:
    """Wait until the daemon handles SIGTERM itself (it then serves), or has exited."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _catches(proc.pid, signal.SIGTERM):
        assert time.monotonic() < deadline, "the daemon never installed its handlers"
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()


@pytest.mark.parametrize("signals,code", [((signal.SIGTERM,), EXIT_OK),
                                          ((signal.SIGTERM, signal.SIGINT), INTERRUPTED)])
def test_a_second_signal_aborts_with_130(site: Site, signals: tuple[int, ...],
                                         code: int, tmp_path: Path) -> None:
    """One SIGTERM: a graceful stop, 0. A second signal before the stop ends: 130 (two
    different signals, so the kernel cannot merge them into one). The daemon is held
    stopped (SIGSTOP) while they are sent, so both are pending when it runs again: a
    test preempted between two kills must not let a quick graceful stop finish first."""
    cfg = site.toml("cs-signal", site.configserver, data_dir=str(tmp_path / "cs"))
    with subprocess.Popen([sys.executable, "-m", "siterecovery", "configserver", "run",
                           "--config", cfg], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd=REPO) as proc:
        try:
            _daemon_ready(proc)
            os.kill(proc.pid, signal.SIGSTOP)
            for sig in signals:
                os.kill(proc.pid, sig)
            os.kill(proc.pid, signal.SIGCONT)
            assert proc.wait(timeout=120) == code, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
