"""The agent's version next to its process server's, and the flag when it is older.

Agents report ``agent_version`` in every heartbeat (``mobility.AGENT_VERSION``, the
bundle's version); process servers report ``version`` in theirs. An agent older than the
process server it is assigned to runs, but misses what the newer release fixed: its
item says so (health ``warning``, one health error with the fix). Versions compare by
their leading numeric parts (``0.10.1`` > ``0.9``); a version that does not start with a
number (``dev``, empty) is never called older, so nothing is flagged on a guess.
"""

from __future__ import annotations

import re
from typing import Any

from configserver import db
from configserver.schema import nullable, obj

AGENT = obj({
    "version": nullable({"type": "string", "description": "the version the agent reported "
                                                          "in its last heartbeat"}),
    "process_server": nullable({"type": "string"}),
    "process_server_version": nullable({"type": "string"}),
    "outdated": {"type": "boolean", "description": "the agent is older than its process "
                                                   "server"},
}, ["version", "process_server", "process_server_version", "outdated"])

_NUMERIC = re.compile(r"^(\d+(?:\.\d+)*)")


def _key(version: str) -> tuple[int, ...] | None:
    m = _NUMERIC.match(version.strip())
    if m is None:
        return None
    parts = [int(p) for p in m[1].split(".")]
    while len(parts) > 1 and parts[-1] == 0:  # 1.0 == 1.0.0
        parts.pop()
    return tuple(parts)


def older(agent: str, server: str) -> bool:
    """True when both versions are numeric and ``agent`` sorts before ``server``."""
    a, s = _key(agent), _key(server)
    return a is not None and s is not None and a < s


def agent_doc(machine: db.Machine | None, server: db.ProcessServer | None) -> dict[str, Any]:
    """The item's ``agent`` block, from its machine and the process server it is on."""
    version = machine.agent_version if machine is not None and machine.agent_version else None
    server_version = server.version if server is not None and server.version else None
    return {"version": version, "process_server": server.name if server is not None else None,
            "process_server_version": server_version,
            "outdated": bool(version and server_version and older(version, server_version))}


def with_agent(doc: dict[str, Any], machine: db.Machine | None,
               server: db.ProcessServer | None) -> dict[str, Any]:
    """``doc`` (an item's API view) with its ``agent`` block; an outdated agent turns a
    normal health into ``warning`` and adds the health error that says what to do."""
    agent = agent_doc(machine, server)
    doc["agent"] = agent
    if agent["outdated"]:
        if doc["health"] == "normal":
            doc["health"] = "warning"
        doc["health_errors"].append(
            f"agent {agent['version']} is older than process server "
            f"{agent['process_server']}'s {agent['process_server_version']}: upgrade it "
            f"(install the current agent bundle: 'siterecovery agent bundle')")
    return doc
