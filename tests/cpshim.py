"""A ``cp`` that stops part way when a test asks: a way to kill or cancel a recovery
inside its target's create (the folder target copies its images with ``cp``).

A server run with ``cp_shim(DIR)``'s environment (or a test process that sets it) runs
``DIR/cp``, which is the real ``cp`` unless ``cp_stops(DIR)`` asked for a stop: then it
writes the first 64 KiB of the image, tells the test its pid and stops itself
(SIGSTOP). The caller ends it with ``kill_stopped``."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

CP_SHIM = """#!{python}
# cp as the folder target runs it (cp OPTIONS SRC DST); when the test asks, it writes
# part of the image, tells the test its pid and stops there
import os, signal, socket, sys
ask = os.path.join(os.environ["SR_TEST_CP"], "stop")
if os.path.exists(ask):
    os.unlink(ask)
    with open(sys.argv[-2], "rb") as src, open(sys.argv[-1], "wb") as dst:
        dst.write(src.read(65536))
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(os.environ["SR_TEST_CP"], "notify"))
        s.sendall(str(os.getpid()).encode())
    os.kill(os.getpid(), signal.SIGSTOP)
os.execv({cp!r}, ["cp", *sys.argv[1:]])
"""


def kill_stopped(pid: int) -> None:
    """SIGKILL the stopped cp (gone already: nothing to do)."""
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def cp_shim(shim: Path) -> dict[str, str]:
    """The environment of a server whose ``cp`` is ``CP_SHIM`` in ``shim``."""
    shim.mkdir()
    (shim / "cp").write_text(CP_SHIM.format(python=sys.executable, cp=shutil.which("cp")))
    (shim / "cp").chmod(0o755)
    return {"PATH": f"{shim}:{os.environ['PATH']}", "SR_TEST_CP": str(shim)}


@asynccontextmanager
async def cp_stops(shim: Path) -> AsyncIterator[asyncio.Future[int]]:
    """Ask the next ``cp`` run through the shim in ``shim`` to stop part way; the future
    gets its pid once it stopped."""
    told: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def tell(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        told.set_result(int(await reader.read()))
        writer.close()
        await writer.wait_closed()

    async with await asyncio.start_unix_server(tell, path=str(shim / "notify")):
        (shim / "stop").touch()
        yield told
