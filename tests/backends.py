"""Real storage backends for tests: Azurite started from npm's package, on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import REPO

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


def azurite_binary() -> str | None:
    env = os.environ.get("SITERECOVERY_AZURITE")
    candidates = [env] if env else []
    candidates += [str(REPO / ".cache/azurite/node_modules/.bin/azurite-blob"),
                   shutil.which("azurite-blob") or ""]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    return None


def missing_backend(what: str, how: str) -> None:
    """Skip locally; in CI a missing real backend is a failure, never a skip."""
    msg = f"{what} is not available: {how}"
    if os.environ.get("CI"):
        pytest.fail(f"CI: {msg}")
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def azurite(workdir: Path, port: int = 0) -> Iterator[str]:
    """Run Azurite's blob service; yield its connection string. Started again with the same
    ``workdir`` and ``port``, it serves the same blobs (an outage, then recovery)."""
    binary = azurite_binary()
    if binary is None:
        missing_backend("Azurite", "run tests/run.sh, which installs azurite@3.35.0")
        raise AssertionError("unreachable")
    port = port or _free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose",
         "--location", str(workdir),
         "--blobHost", "127.0.0.1", "--blobPort", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    # Read until Azurite says it listens (or exits); the suite timeout bounds this.
    for line in proc.stdout:
        seen.append(line)
        if "successfully listen" in line:
            break
    else:
        proc.wait()
        raise RuntimeError("Azurite did not start:\n" + "".join(seen))
    drain = threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True)
    drain.start()  # keep Azurite's pipe from filling up
    try:
        yield (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
               f"AccountKey={AZURITE_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        drain.join(timeout=10)
        proc.stdout.close()


def postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    return found[0].parent if found else None


@contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """Run a throwaway PostgreSQL server (Debian's package) on loopback; yield its base URL
    ``postgresql+asyncpg://postgres@127.0.0.1:PORT``."""
    bindir = postgres_bin()
    if bindir is None:
        missing_backend("PostgreSQL", "run tests/run.sh, which installs Debian's postgresql")
        raise AssertionError("unreachable")
    workdir.mkdir(parents=True, exist_ok=True)
    data, sock = workdir / "data", workdir / "sock"
    sock.mkdir(exist_ok=True)
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        os.chown(sock, pw.pw_uid, pw.pw_gid)
        traversable(workdir.parent)
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                    "-A", "trust", "-E", "UTF8", "--no-sync"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port = _free_port()
    proc = subprocess.Popen(
        [*prefix, str(bindir / "postgres"), "-D", str(data), "-p", str(port),
         "-k", str(sock), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
         "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
         "-c", "max_connections=200", "-c", "logging_collector=off"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # read until it accepts connections (or exits)
        seen.append(line)
        if "ready to accept connections" in line:
            break
    else:
        proc.wait()
        raise RuntimeError("PostgreSQL did not start:\n" + "".join(seen))
    drain = threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True)
    drain.start()
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}"
    finally:
        proc.terminate()  # SIGTERM: smart shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        drain.join(timeout=10)
        proc.stdout.close()


async def fresh_database(base_url: str) -> str:
    """Create an empty database on the server at ``base_url``; return its URL."""
    import secrets

    import asyncpg

    name = "t_" + secrets.token_hex(6)
    conn = await asyncpg.connect(base_url.replace("postgresql+asyncpg://", "postgresql://")
                                 + "/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{base_url}/{name}"


def traversable(folder: Path) -> Path:
    """``folder``, made traversable by other users (the emulator's libvirt-qemu, postgres)
    down from below /tmp: pytest's temp folders are 0700."""
    for p in [folder, *folder.parents]:
        if p == Path("/tmp") or p == p.parent:
            break
        p.chmod(p.stat().st_mode | 0o011)
    return folder
