"""Log lines: human-readable on a terminal, JSON lines otherwise, the same fields either way;
``--log-format`` / ``$SITERECOVERY_LOG_FORMAT`` choose, and a wrong choice exits 2."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, write_toml

STARTED = "configserver_started"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _config(tmp_path: Path) -> str:
    return str(write_toml(tmp_path / "cs.toml", {
        "data_dir": str(tmp_path / "cs"), "listen_port": 0, "site_port": -1}))


def _until(proc: subprocess.Popen[bytes], fd: int, marker: str) -> str:
    """What the daemon printed on ``fd`` up to the end of the line holding ``marker``."""
    seen = b""
    deadline = time.monotonic() + 60
    while not re.search(re.escape(marker.encode()) + b".*\n", seen):
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, seen.decode(errors="replace")[-2000:]
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the pty's other side closed
                chunk = b""
            assert chunk, seen.decode(errors="replace")[-2000:]
            seen += chunk
    return ANSI.sub("", seen.decode(errors="replace"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def _line(out: str) -> str:
    return next(line for line in out.splitlines() if STARTED in line)


def test_a_terminal_gets_readable_lines(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "SITERECOVERY_LOG_FORMAT"}
    proc = subprocess.Popen([sys.executable, "-m", "siterecovery", "configserver", "run",
                             "--config", _config(tmp_path)], stdout=slave,
                            stderr=subprocess.DEVNULL, cwd=REPO, env=env)
    os.close(slave)
    try:
        line = _line(_until(proc, master, STARTED))
    finally:
        _stop(proc)
        os.close(master)
    assert not line.lstrip().startswith("{"), line
    assert re.search(r"\bport=\d+", line), line  # the same fields, as key=value
    assert "info" in line


def test_a_pipe_gets_json_lines(tmp_path: Path) -> None:
    """A pipe (journald, a log shipper) gets JSON by default."""
    env = {k: v for k, v in os.environ.items() if k != "SITERECOVERY_LOG_FORMAT"}
    proc = subprocess.Popen([sys.executable, "-m", "siterecovery", "configserver", "run",
                             "--config", _config(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
                            env=env)
    assert proc.stdout is not None
    try:
        line = _line(_until(proc, proc.stdout.fileno(), STARTED))
    finally:
        _stop(proc)
        proc.stdout.close()
    event = json.loads(line)
    assert event["event"] == STARTED and isinstance(event["port"], int)


def test_console_format_forced_on_a_pipe(tmp_path: Path) -> None:
    """``$SITERECOVERY_LOG_FORMAT`` (as ``--log-format``) overrides what auto would pick."""
    proc = subprocess.Popen([sys.executable, "-m", "siterecovery", "configserver", "run",
                             "--config", _config(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
                            env={**os.environ, "SITERECOVERY_LOG_FORMAT": "console"})
    assert proc.stdout is not None
    try:
        line = _line(_until(proc, proc.stdout.fileno(), STARTED))
    finally:
        _stop(proc)
        proc.stdout.close()
    assert not line.lstrip().startswith("{") and re.search(r"\bport=\d+", line), line


def test_a_wrong_format_in_the_environment_exits_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "siterecovery", "policy", "list"],
                       capture_output=True, text=True, cwd=REPO, timeout=60,
                       env={**os.environ, "SITERECOVERY_LOG_FORMAT": "xml"})
    assert r.returncode == 2, r.stderr
    assert "SITERECOVERY_LOG_FORMAT" in r.stderr and "Traceback" not in r.stderr
