"""Routes: items."""

from __future__ import annotations

from configserver.rest import Route

ROUTES: list[Route] = []
