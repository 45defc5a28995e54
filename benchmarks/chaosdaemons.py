"""The processes ``chaos.py`` disturbs: the process server and the configuration server
(each ``siterecovery … run``, its own process, killed with ``kill -9`` and started again
on the same data directory), and the TCP proxy between the agent and the process server
that resets connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proxy:
    """127.0.0.1:port → the process server's current port; ``reset()`` aborts every
    connection in both directions."""

    def __init__(self) -> None:
        self.target = 0
        self.port = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.transport.abort()
            return
        pair = (w, uw)
        self._pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pipe(r, uw), pipe(ur, w))
        finally:
            self._pairs.discard(pair)

    def reset(self) -> None:
        for a, b in list(self._pairs):
            a.transport.abort()
            b.transport.abort()

    async def close(self) -> None:
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Daemon:
    """``siterecovery WHAT run --config CONFIG``; ``start()`` returns the JSON log line
    that says it started (``started`` is that event's name). The log is read on: each
    ``point_uploaded`` line (a process server's) lands in ``points`` (cycle → point);
    that and each ``point_recorded`` (a configuration server's) set ``changed``."""

    def __init__(self, what: str, config: Path, started: str) -> None:
        self.what, self.config, self.started = what, config, started
        self.proc: asyncio.subprocess.Process | None = None
        self.points: dict[str, str] = {}
        self.changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> dict[str, Any]:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "siterecovery", "--log-level", "info", self.what, "run",
            "--config", str(self.config), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, limit=1 << 20)
        assert self.proc.stdout is not None
        seen: list[bytes] = []
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                await self.proc.wait()
                raise RuntimeError(f"the {self.what} did not start (exit "
                                   f"{self.proc.returncode}):\n"
                                   + b"".join(seen[-20:]).decode(errors="replace"))
            seen.append(line)
            ev = json.loads(line) if line.startswith(b"{") else {}
            if ev.get("event") == self.started:
                self._reader = asyncio.create_task(self._read())
                return dict(ev)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if b'"point_uploaded"' in line:
                ev = json.loads(line)
                self.points[str(ev["cycle"])] = str(ev["point"])
                self.changed.set()
            elif b'"point_recorded"' in line:
                self.changed.set()

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader
