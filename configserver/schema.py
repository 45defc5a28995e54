"""JSON-schema builders and the JSON forms of values, shared by the REST layer and the
domain modules that describe their own documents (jobs, items). No HTTP here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from common.names import NAME_PATTERN
from common.timefmt import iso_seconds

NAME = {"type": "string", "pattern": NAME_PATTERN}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message", "hint"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "hint": {"type": "string"}}}}}


def iso(t: float | None) -> str | None:
    """UNIX seconds → ISO 8601 UTC (``2026-11-25T10:00:00Z``); None stays None."""
    return None if t is None else iso_seconds(t)


def obj(props: dict[str, Any], required: Iterable[str] = (), *,
        extra: bool = False) -> dict[str, Any]:
    """A JSON-schema object; unknown properties refused unless ``extra``."""
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": extra}


def array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    t = schema.get("type")
    return {**schema, "type": [t, "null"]} if isinstance(t, str) else {
        "anyOf": [schema, {"type": "null"}]}
