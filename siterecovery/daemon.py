"""Running a daemon in the foreground until systemd (or Ctrl-C) stops it, and the checks
of its config and command line that make a bad one exit 2 (``UsageError``/``ConfigError``)
before anything starts, instead of failing later with another code."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Iterable
from typing import Protocol

import structlog

from siterecovery.tomlconfig import ConfigError

log = structlog.get_logger("siterecovery")


class Service(Protocol):
    """What a daemon offers: start (return once serving), stop (return once stopped)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def wait_for_signal() -> None:
    """Return on the first SIGTERM/SIGINT; a second one aborts the graceful shutdown."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    count = 0

    def on_signal() -> None:
        nonlocal count
        count += 1
        if count > 1:
            log.warning("second_signal_aborting")
            os._exit(130)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()


async def run_until_signal(service: Service) -> int:
    """Start ``service``, serve until the first signal, stop it; exit code 0."""
    await service.start()
    try:
        await wait_for_signal()
    finally:
        await service.stop()
    return 0


# The files each daemon's config names that must exist when it starts (empty = not used).
# Files a daemon creates on first start (tokens, the CA, the secrets key) are not here.
PROCSERVER_FILES = ("vault_key_file", "vault_passphrase_file", "tls_cert", "tls_key", "tls_ca",
                    "configserver_token_file")
MOBILITY_FILES = ("tls_ca", "tls_cert", "tls_key")


def require_files(cfg: object, where: str, keys: Iterable[str]) -> None:
    """Raise ``ConfigError`` (exit code 2) naming the config file ``where``, the key and
    the path for the first of ``keys`` whose value is a path that cannot be opened for
    reading; empty values are skipped (optional files)."""
    for key in keys:
        path = getattr(cfg, key)
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            why = "does not exist" if isinstance(e, FileNotFoundError) else \
                f"cannot be read ({e.strerror or e})"
            raise ConfigError(f"{where}: key {key!r}: file {str(path)!r} {why}") from None


def port_number(text: str) -> int:
    """An ``argparse`` type: a TCP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def site_port_number(text: str) -> int:
    """An ``argparse`` type: a port as ``port_number``, or -1 (no site listener)."""
    return -1 if text.strip() == "-1" else port_number(text)


def listen_address(text: str) -> str:
    """An ``argparse`` type: ``HOST:PORT`` (``:PORT``: the default host), returned
    unchanged."""
    _host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:9443)")
    port_number(port)
    return text
