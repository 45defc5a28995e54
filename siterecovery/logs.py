"""structlog set-up: events to stdout, JSON when it is a pipe or a file (journald, a log
shipper), human-readable lines when it is a terminal; the same fields either way."""

from __future__ import annotations

import logging
import sys

import structlog

FORMATS = ("auto", "json", "console")


def wants_json(fmt: str) -> bool:
    """``auto`` (the default): JSON unless stdout is a terminal."""
    if fmt == "auto":
        return not sys.stdout.isatty()
    return fmt == "json"


def configure(level: str = "info", *, json: bool = True) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
