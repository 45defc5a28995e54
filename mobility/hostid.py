"""The machine the agent runs on, as the hypervisor or the firmware names it.

A recovered machine boots from a copy of the original's disks: the agent's
certificate, configuration, state and ``/etc/machine-id`` come with them, so nothing
on the disk tells the two apart. The SMBIOS system UUID does (``product_uuid``: a
libvirt domain's UUID, an Azure or VMware VM's id, a server's board): the agent reports
it with every settings request and heartbeat, and the configuration server answers
the original machine and the recovered one differently (configserver/hostroles.py).

The UUID the agent last committed a cycle on is kept in the state directory
(``host-id``): a state directory found on another machine holds another machine's
fingerprint maps, so the next cycle is a resync by basis, not a delta on them.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from common.fs import atomic_write

HOST_ID_FILE = "host-id"  # in the state directory: the machine its maps were made on
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# What firmware writes when it has no UUID to give.
_PLACEHOLDERS = {"00000000-0000-0000-0000-000000000000",
                 "ffffffff-ffff-ffff-ffff-ffffffffffff",
                 "03000200-0400-0500-0006-000700080009"}


def read_host_id(path: str) -> str | None:
    """The SMBIOS UUID in ``path`` (lowercase), or None: no file (no SMBIOS, not root),
    an empty setting, or a placeholder some firmware writes."""
    if not path:
        return None
    try:
        text = Path(path).read_text(errors="replace").strip().lower()
    except OSError:
        return None
    return text if _UUID.fullmatch(text) and text not in _PLACEHOLDERS else None


def valid_host_id(value: object) -> bool:
    """Whether ``value`` is a host id as ``read_host_id`` returns them (for servers)."""
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def moved(state_dir: Path, host_id: str | None) -> str | None:
    """The host id the state was made on, when it is not ``host_id``: the state
    directory came with a copy of the disks (a recovered or cloned machine)."""
    if host_id is None:
        return None
    with contextlib.suppress(OSError):
        before = (state_dir / HOST_ID_FILE).read_text().strip()
        if before and before != host_id:
            return before
    return None


def record(state_dir: Path, host_id: str | None) -> None:
    """Note ``host_id`` as the machine of the state just committed."""
    if host_id is None:
        return
    path = state_dir / HOST_ID_FILE
    with contextlib.suppress(OSError):
        if path.read_text().strip() == host_id:
            return
    atomic_write(path, f"{host_id}\n".encode())
