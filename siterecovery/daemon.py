"""Running a daemon in the foreground until systemd (or Ctrl-C) stops it."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Protocol

import structlog

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
