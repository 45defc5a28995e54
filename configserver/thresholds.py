"""The process-server thresholds that alerts raise on and that assignment avoids.

A leaf module: ``alerts`` (which raises the alerts) and ``assignment`` (which will not give
a machine to a process server in such a state) both read them, and neither imports the
other.
"""

from __future__ import annotations

CACHE_FREE_WARNING, CACHE_FREE_CRITICAL = 0.30, 0.25
BACKLOG_WARNING_S, BACKLOG_CRITICAL_S = 30 * 60, 45 * 60
HEARTBEAT_CRITICAL_S = 15 * 60
