"""A daemon catches SIGTERM/SIGINT from before it starts: a stop asked while it starts
is a graceful stop once it has started, not a kill by the default handler."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from siterecovery.daemon import StopSignals
from tests.helpers import configserver_daemon


async def test_a_signal_before_anyone_waits_is_not_lost() -> None:
    signals = StopSignals()
    os.kill(os.getpid(), signal.SIGTERM)  # while "starting": nobody waits yet
    async with asyncio.timeout(10):
        await signals.wait()


async def test_sigterm_as_soon_as_started_stops_the_configuration_server_gracefully(
        tmp_path: Path) -> None:
    cs = configserver_daemon(tmp_path)
    await cs.start()
    assert await cs.stop() == 0
    assert cs.events("configserver_stopped")
