"""Replicated items: state, health, progress, RPO and latest points."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from configserver.server import ConfigServer


async def point_recorded(server: ConfigServer, doc: dict[str, Any]) -> None:
    """A new recovery point reached the catalog: update its item, wake waiting jobs."""
    await server.notify()
