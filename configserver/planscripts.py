"""A recovery plan's group script, run on the configuration server.

The script is executed directly (no shell) in a session of its own, with a small
environment: ``PATH`` and ``LANG`` of the server and what the plan tells it
(``SITERECOVERY_PLAN``, ``SITERECOVERY_PLAN_GROUP``, ``SITERECOVERY_PLAN_ITEMS`` — the
group's items, space-separated —, ``SITERECOVERY_PLAN_OPERATION``,
``SITERECOVERY_PLAN_PHASE`` — pre or post — and ``SITERECOVERY_JOB``). Its standard
output and error go into one stream, of which only the last ``TAIL_BYTES`` are kept (so
memory is bounded whatever it prints). Past its timeout the whole session is killed.
A script that was running when the server stopped runs again when the job resumes:
scripts must be safe to run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

TAIL_BYTES = 2000
READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class ScriptResult:
    status: int | None  # the exit status; None: killed at its timeout
    output: str  # the tail of stdout and stderr together


async def _tail(stream: asyncio.StreamReader, kept: bytearray) -> None:
    while chunk := await stream.read(READ_CHUNK):
        kept += chunk
        del kept[:-TAIL_BYTES]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_script(path: str, args: list[str], env: dict[str, str], timeout: float
                     ) -> ScriptResult:
    """Run ``path args`` with ``env`` added to the small base environment; its result.
    ``OSError`` if it cannot be started."""
    base = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
    proc = await asyncio.create_subprocess_exec(
        path, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**base, **env}, start_new_session=True)
    assert proc.stdout is not None
    kept = bytearray()
    reader = asyncio.create_task(_tail(proc.stdout, kept))
    status: int | None = None
    try:
        async with asyncio.timeout(timeout):
            status = await proc.wait()
    except TimeoutError:
        _kill(proc.pid)
        await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled: the job is cancelled or the server stops
            _kill(proc.pid)
            await proc.wait()
            reader.cancel()
    # a process it left behind may hold the pipe open: do not wait for it long
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.shield(reader)
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    return ScriptResult(status, bytes(kept).decode("utf-8", "replace").strip())
