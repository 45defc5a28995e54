"""Waiting for a command with a deadline, and ending it when the deadline passes.

A command that ends just as its time runs out is already reaped by the event loop by
the time it is killed: asyncio then raises ``ProcessLookupError`` from ``kill()``. That
is not a failure of its own here: the caller reports the timeout it asked about.
"""

from __future__ import annotations

import asyncio
import contextlib


async def stop(proc: asyncio.subprocess.Process) -> int:
    """Kill ``proc`` unless it has ended, then reap it; its return code."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    return await proc.wait()


async def communicate(proc: asyncio.subprocess.Process, timeout: float,
                      ) -> tuple[bytes, bytes]:
    """``proc.communicate()`` within ``timeout`` seconds; past it ``proc`` is killed and
    reaped, and ``TimeoutError`` raised."""
    try:
        async with asyncio.timeout(timeout):
            return await proc.communicate()
    except TimeoutError:
        await stop(proc)
        raise
