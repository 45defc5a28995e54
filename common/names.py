"""Names and patterns shared by the agent, the wire checks, the servers and the API.

Each rule lives here once: the REST schemas use the pattern strings, Python code
uses the compiled forms.
"""

from __future__ import annotations

import re
from typing import TypeGuard

# Machines, policies, accounts, process servers: what operators name.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# Disks of a machine.
DISK_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Cycle ids the agent makes up.
ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"

NAME = re.compile(NAME_PATTERN)
DISK = re.compile(DISK_PATTERN)
ID = re.compile(ID_PATTERN)
HEX64 = re.compile(r"[0-9a-f]{64}")


def is_name(v: object) -> TypeGuard[str]:
    return isinstance(v, str) and NAME.fullmatch(v) is not None


def is_disk_name(v: object) -> TypeGuard[str]:
    return isinstance(v, str) and DISK.fullmatch(v) is not None


def is_id(v: object) -> TypeGuard[str]:
    return isinstance(v, str) and ID.fullmatch(v) is not None
