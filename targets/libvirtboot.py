"""The libvirt target's boot proof: start a domain and read its serial console until a
login prompt (or the configured marker) shows, a line after which no boot follows
shows, the machine stops, or the time runs out."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from targets.base import BootFailedError, BootProof
from targets.console import ConsoleLog, proves_boot
from targets.virsh import Virsh

# console lines after which no boot follows: fail now rather than at the timeout
FATAL = re.compile(r"No bootable device|Kernel panic - not syncing|"
                   r"siterecovery-boot-failed")
POLL = 0.2  # seconds between reads of the console log while waiting for a boot


async def running(virsh: Virsh, name: str) -> bool:
    return (await virsh("domstate", name)).strip() in ("running", "paused", "in shutdown")


async def boot(virsh: Virsh, name: str, console_log: Path, marker: str | None,
               timeout: float) -> BootProof:
    """Start domain ``name`` and wait for ``marker`` (or a login prompt) in
    ``console_log``.

    A domain already running is followed, not started again (``seconds`` then counts
    from this call). On no proof within ``timeout``, on a console line after which no
    boot follows, or on the machine stopping first, the domain is stopped (left
    defined, for cleanup) and ``BootFailedError`` carries the console's last lines."""
    log = ConsoleLog(console_log)
    started = time.monotonic()
    if not await running(virsh, name):
        await virsh("start", name)
    # else a boot already under way (a job resumed after a restart): follow it; its
    # console log holds this run from its start (append='off')
    deadline = started + timeout
    while True:
        line = log.find(lambda ln: proves_boot(ln, marker) or bool(FATAL.search(ln)))
        if line is not None and FATAL.search(line):
            await virsh.gone("destroy", name)
            raise BootFailedError(f"{name} cannot boot: its console shows {line!r}",
                                  log.tail())
        if line is not None:
            return BootProof(time.monotonic() - started, line, log.tail())
        if not await running(virsh, name):
            # It may have shown the proof between the look above and stopping (a guest
            # that powers off once booted): its console is whole now, look once more.
            line = log.find(lambda ln: proves_boot(ln, marker) or bool(FATAL.search(ln)))
            if line is not None and not FATAL.search(line):
                return BootProof(time.monotonic() - started, line, log.tail())
            raise BootFailedError(f"{name} stopped before it showed "
                                  f"{marker or 'a login prompt'} on its console",
                                  log.tail())
        if time.monotonic() > deadline:
            await virsh.gone("destroy", name)
            log.find(lambda ln: False)
            raise BootFailedError(f"{name} showed no {marker or 'login prompt'} on "
                                  f"its console within {timeout:g} s", log.tail())
        await asyncio.sleep(POLL)
