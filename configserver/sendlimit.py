"""A policy's send limit: the bandwidth its agents may use towards the process server.

The same four values as the agent's own ``mobility.toml`` (``send_limit_work_mbps``,
``send_limit_off_mbps``, ``work_days``, ``work_hours``; see ``common.pacing.Schedule``):
Mbit/s inside the work hours of the work days and outside them, 0 meaning unlimited.
A policy without one (``None``) leaves each agent its own file's limits; a policy with
one overrides them. The configuration server delivers it in the agent settings'
``bandwidth``.
"""

from __future__ import annotations

from typing import Any

from common.pacing import DAYS, Schedule
from configserver.schema import nullable, obj

MAX_MBPS = 100_000  # 100 Gbit/s: anything above is a typo
DEFAULT_DAYS, DEFAULT_HOURS = "mon-fri", "08:00-18:00"
_DAY = "(" + "|".join(DAYS) + ")"
_DAYS_PATTERN = f"^{_DAY}(-{_DAY})?(,{_DAY}(-{_DAY})?)*$"
_HOURS_PATTERN = "^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-4]):[0-5][0-9]$"
_MBPS = {"type": "number", "minimum": 0, "maximum": MAX_MBPS}

FIELDS: dict[str, Any] = {
    "work_mbps": {**_MBPS, "description": "Mbit/s during the work hours of the work days; "
                                          "0: unlimited"},
    "off_mbps": {**_MBPS, "description": "Mbit/s outside them; 0: unlimited"},
    "work_days": {"type": "string", "maxLength": 64, "pattern": _DAYS_PATTERN,
                  "description": f"day names, ranges or lists (default {DEFAULT_DAYS})"},
    "work_hours": {"type": "string", "pattern": _HOURS_PATTERN,
                   "description": f"HH:MM-HH:MM, the start before the end (default "
                                  f"{DEFAULT_HOURS})"},
}
# In a request: the two rates are required, the days and hours default.
GIVEN = nullable(obj(FIELDS, ["work_mbps", "off_mbps"]))
SHOWN = nullable(obj(FIELDS, list(FIELDS)))
DESCRIPTION = ("the send limit of the policy's agents towards the process server (as "
               "mobility.toml's send_limit_work_mbps, send_limit_off_mbps, work_days, "
               "work_hours); null: each agent's own mobility.toml limits apply")


def normalize(given: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stored form of a requested send limit (defaults filled in, numbers as floats).
    Raises ``ValueError`` naming what is wrong (days or hours that do not parse)."""
    if given is None:
        return None
    limit = {"work_mbps": float(given["work_mbps"]), "off_mbps": float(given["off_mbps"]),
             "work_days": str(given.get("work_days", DEFAULT_DAYS)).lower(),
             "work_hours": str(given.get("work_hours", DEFAULT_HOURS))}
    schedule(limit)
    return limit


def schedule(limit: dict[str, Any]) -> Schedule:
    """The ``Schedule`` a stored send limit stands for (``ValueError`` if it is invalid)."""
    return Schedule.from_mbps(float(limit["work_mbps"]), float(limit["off_mbps"]),
                              str(limit["work_days"]), str(limit["work_hours"]))

