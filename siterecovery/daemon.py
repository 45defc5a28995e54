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

from common.gcsettle import settle_startup_heap
from siterecovery.tomlconfig import ConfigError

log = structlog.get_logger("siterecovery")


class Service(Protocol):
    """What a daemon offers: start (return once serving), stop (return once stopped)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StopSignals:
    """SIGTERM/SIGINT, caught from the moment this is made: a daemon makes it before it
    starts, so a stop asked while it starts (systemd stopping it at once, say) is a
    graceful stop once it has started, never the default handler's kill. A second signal
    aborts the graceful shutdown (exit 130)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._count = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        self._count += 1
        if self._count > 1:
            log.warning("second_signal_aborting")
            os._exit(130)
        self._stop.set()

    async def wait(self) -> None:
        """Return once the first signal came (at once if it came already)."""
        await self._stop.wait()


async def wait_for_signal() -> None:
    """Return on the first SIGTERM/SIGINT from now on (``StopSignals`` for a daemon)."""
    await StopSignals().wait()


def settled() -> None:
    """The daemon has started: its start-up objects leave the collector's full
    collections (common/gcsettle.py); logged with how many they are."""
    log.info("startup_heap_settled", frozen_objects=settle_startup_heap())


async def run_until_signal(service: Service) -> int:
    """Start ``service``, serve until the first signal (one during the start included),
    stop it; exit code 0."""
    signals = StopSignals()
    await service.start()
    settled()
    try:
        await signals.wait()
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
