"""One connection from the agent to the process server: frames out, frames in, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Any

from mobility.tracker import CHUNK
from wire.protocol import (
    HEARTBEAT_FRAME,
    Frame,
    FrameType,
    ProtocolError,
    RemoteError,
    features_of,
    raise_if_error,
    read_frame,
)

WRITE_HIGH_WATER = 2 * CHUNK  # bytes queued on the connection before a send waits
FOREVER = 10.0 * 365 * 86400  # "no timeout" for read_frame


def broken(e: BaseException) -> bool:
    """The connection failed (a resume may help), as opposed to a refusal or bad data."""
    if isinstance(e, ProtocolError):
        return e.code in ("timeout", "truncated")
    return isinstance(e, ConnectionError | OSError | ssl.SSLError | TimeoutError |
                      asyncio.IncompleteReadError)


class Link:
    """One connection to the process server: frames out, frames in, heartbeats."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 welcome: dict[str, Any]) -> None:
        self.reader, self.writer = reader, writer
        self.features = features_of(welcome)
        self.heartbeat = "heartbeat" in self.features
        self.resumable = "resume" in self.features
        # The server's idle timeout: silence this long (no frame, no heartbeat) is death.
        self.idle = min(3600.0, max(0.2, float(welcome.get("idle_timeout_seconds") or 60)))
        self.every = min(self.idle / 2, max(0.05, float(welcome.get("heartbeat_seconds") or 15)))
        self.last_sent = time.monotonic()
        self._frames: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self._error: BaseException | None = None
        # An ERROR the server sent that nobody has read yet: why the connection ended.
        self.remote_error: RemoteError | None = None
        self._waiting = 0  # recv() calls waiting for an answer
        self._tasks = [asyncio.create_task(self._read())]
        if self.heartbeat:
            self._tasks.append(asyncio.create_task(self._beat()))
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    async def _read(self) -> None:
        try:
            while True:
                f = await read_frame(self.reader, timeout=self.idle if self.heartbeat
                                     else FOREVER)
                if f.type == FrameType.ERROR:
                    try:
                        raise_if_error(f)
                    except RemoteError as e:
                        self.remote_error = e
                    except ProtocolError:
                        pass
                    if not self._waiting:  # not an answer: the server ends the session
                        self._frames.put_nowait(f)
                        self._error = ConnectionResetError("the process server ended the "
                                                           "session")
                        self._frames.put_nowait(self._error)
                        self.writer.transport.abort()  # a blocked send fails now
                        return
                if f.type != FrameType.HEARTBEAT:
                    self._frames.put_nowait(f)
        except Exception as e:
            if isinstance(e, ProtocolError) and e.code == "timeout":
                e = ProtocolError("timeout", f"nothing from the process server for "
                                             f"{self.idle:g}s (not even a heartbeat)")
            self._error = e
            self._frames.put_nowait(e)
            self.writer.transport.abort()  # a send blocked on a dead peer fails now

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.last_sent + self.every - time.monotonic()))
            if time.monotonic() - self.last_sent >= self.every:
                if self.writer.transport.is_closing():
                    return
                self.writer.write(HEARTBEAT_FRAME)
                self.last_sent = time.monotonic()

    def send(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self.writer.transport.is_closing():
            raise ConnectionResetError("the connection to the process server is closed")
        self.writer.write(data)
        self.last_sent = time.monotonic()

    async def drain(self) -> None:
        await self.writer.drain()
        if self._error is not None:
            raise self._error

    async def recv(self, timeout: float) -> Frame:
        """The next frame that is not a heartbeat, within ``timeout`` seconds."""
        self._waiting += 1
        try:
            async with asyncio.timeout(timeout):
                item = await self._frames.get()
        except TimeoutError:
            raise ProtocolError("timeout", f"no answer from the process server within "
                                           f"{timeout:g}s") from None
        finally:
            self._waiting -= 1
        if isinstance(item, BaseException):
            self._frames.put_nowait(item)  # every later call fails the same way
            raise item
        if item.type == FrameType.ERROR:
            self.remote_error = None  # read: the caller deals with it
        return item

    def why(self, e: BaseException) -> BaseException:
        """The server's own explanation of a failure, if it sent one."""
        return self.remote_error or e

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)
