"""The configuration server's background work: alerts, job runner."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from configserver.server import ConfigServer


def background_tasks(server: ConfigServer) -> list[Coroutine[Any, Any, None]]:
    from configserver import alerts, certs, replication
    from configserver.jobs import JobEngine

    assert replication.ENABLE  # importing it registers the replication job kinds
    return [alerts.run(server), certs.record_own(server), JobEngine(server).run()]
