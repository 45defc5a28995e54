"""A configuration server whose clock a test can move: real time until ``now`` is set."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer


class Clock:
    """UNIX seconds: ``time.time()``, or ``now`` once a test sets it."""

    def __init__(self) -> None:
        self.now: float | None = None

    def __call__(self) -> float:
        return time.time() if self.now is None else self.now


@asynccontextmanager
async def clocked_configserver(data_dir: Path, catalog_url: str, clock: Clock,
                               **settings: Any) -> AsyncIterator[ConfigServer]:
    """A running configuration server (admin and site listeners on free ports) on ``clock``,
    with ``settings`` of its configuration besides. Automatic process-server failover is
    off unless ``procserver_failover_seconds`` is given: a clock moved past its 900 s
    would make every process server dead and move its machines in the middle of a test
    about something else."""
    settings.setdefault("procserver_failover_seconds", 0.0)
    server = ConfigServer(ConfigServerConfig(data_dir=str(data_dir), listen_port=0, site_port=0,
                                             database_url=catalog_url, **settings), clock=clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
