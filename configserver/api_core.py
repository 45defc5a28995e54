"""Routes: health and Prometheus metrics (no token: scrape and probe freely)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from configserver.rest import Call, Route, obj, reply


async def health(call: Call) -> web.Response:
    return reply({"status": "ok"})


async def metrics(call: Call) -> web.Response:
    return web.Response(body=generate_latest(call.services.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


ROUTES = [
    Route("GET", "/healthz", health, "Liveness probe", "core", auth="none",
          responses={200: obj({"status": {"const": "ok"}}, ["status"])},
          listeners=("admin", "site")),
    Route("GET", "/metrics", metrics, "Prometheus metrics (text exposition format)", "core",
          auth="none", responses={200: None}),
]
