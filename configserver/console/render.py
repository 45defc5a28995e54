"""The console's HTML: Jinja2 templates (autoescaped) and the filters they use."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def duration(seconds: float | int | None) -> str:
    """``3725`` → ``1 h 2 min``; ``42.4`` → ``42 s``; None → an em dash."""
    if seconds is None:
        return "—"
    s = round(float(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def when(value: str | float | int | None) -> str:
    """An API time (ISO 8601 or UNIX seconds) as ``2026-11-25 10:00:00 UTC``."""
    if value is None or value == "":
        return "—"
    if isinstance(value, (int, float)):
        t = dt.datetime.fromtimestamp(float(value), dt.UTC)
    else:
        try:
            t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def clock(value: str | float | int | None) -> str:
    """An API time as ``10:00:00`` (UTC), for tables where the day is the same."""
    full = when(value)
    return full[11:19] if full.endswith(" UTC") else full


def short(point: str | None) -> str:
    """A point or job id, shortened for a table (the full id is in its title)."""
    return "—" if not point else point[:12]


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(duration=duration, when=when, clock=clock, short=short)
    return env


def html(env: jinja2.Environment, template: str, status: int = 200,
         **context: Any) -> web.Response:
    return web.Response(text=env.get_template(template).render(**context), status=status,
                        content_type="text/html", charset="utf-8")
