"""The server's receiving side of a 9443 connection: frames parsed in the receive buffers.

``FrameStream`` is the asyncio protocol the listener hands each connection to; it yields
``RawFrame``s, whole frames located inside its buffers, so runs of BLOCK frames reach
the cache without a copy. Only the process server uses it (agents read with
``wire.read_frame``); like ``wire`` it needs nothing beyond the standard library.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any, cast

from wire.protocol import (
    BLOCK_HEAD,
    HEADER,
    MAX_FRAME,
    Frame,
    FrameType,
    ProtocolError,
    parse_header,
)


@dataclass(frozen=True, slots=True)
class RawFrame:
    """A whole frame inside a receive buffer: ``buf[start:end]`` is its header and payload.

    Frames that arrived back to back in one buffer are adjacent there, so a run of
    them can be handed on as one slice."""

    type: FrameType
    buf: bytearray
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def frame(self) -> Frame:
        """A ``Frame`` with its own copy of the payload (for control frames)."""
        return Frame(self.type, bytes(self.buf[self.start + HEADER.size:self.end]))

    def block_head(self) -> tuple[int, int]:
        """``(disk index, block number)`` of a BLOCK or ZERO frame."""
        if self.size < HEADER.size + BLOCK_HEAD.size:
            raise ProtocolError("bad_block", f"{self.type.name} frame is too short")
        disk, n = BLOCK_HEAD.unpack_from(self.buf, self.start + HEADER.size)
        return disk, n


class FrameStream(asyncio.BufferedProtocol):
    """The receiving side of one connection, as a protocol that parses frames in place.

    The transport (TLS included) writes straight into large chunks owned here; whole
    frames come out as memoryviews of those chunks, without another copy, so a run of
    BLOCK frames can be written to the cache as it arrived. A frame that straddles two
    chunks is joined into one buffer. Reading pauses while ``high_water`` bytes wait to
    be parsed (TCP backpressure reaches the peer) and resumes below half of that.
    Every wait for a frame has a deadline: a frame must be whole within ``timeout``
    seconds of the call that waits for it, however slowly its bytes trickle in.
    """

    def __init__(self, *, chunk: int = 1 << 20, high_water: int = 2 << 20,
                 max_frame: int = MAX_FRAME) -> None:
        # Never pause short of a whole frame: with a largest frame still incomplete below
        # the mark, reading would stop for good (and the peer time out).
        self.chunk, self.max_frame = chunk, max_frame
        self.high_water = max(high_water, max_frame + 1)
        self.transport: asyncio.Transport | None = None
        # Unread data: a deque of [chunk, start, end]; the last chunk also takes writes.
        self._chunks: collections.deque[list[Any]] = collections.deque()
        self._tail: bytearray = bytearray(0)
        self._tail_end = 0
        self._unread = 0
        self._paused = False
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost = False
        self._lost_waiters: list[asyncio.Future[None]] = []
        self._discarding = False
        self._next: tuple[FrameType, int] | None = None  # parsed header of the next frame
        self._interrupt: BaseException | None = None  # raised by the next wait for a frame

    # -- protocol callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        if self._unread >= self.high_water:
            self._pause()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._discarding:
            return memoryview(self._tail)[:] if len(self._tail) >= 16 << 10 \
                else memoryview(bytearray(64 << 10))
        want = max(sizehint, 16 << 10) if sizehint > 0 else 64 << 10
        if len(self._tail) - self._tail_end < min(want, 16 << 10) + 1:
            self._tail = bytearray(max(self.chunk, want))
            self._tail_end = 0
            self._chunks.append([self._tail, 0, 0])
        return memoryview(self._tail)[self._tail_end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._discarding:
            self._wake()
            return
        self._tail_end += nbytes
        self._chunks[-1][2] = self._tail_end
        self._unread += nbytes
        if self._unread >= self.high_water:
            self._pause()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        if exc is not None:
            self._error = exc
        self._wake()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters.clear()
        for w in self._lost_waiters:
            if not w.done():
                w.set_result(None)
        self._lost_waiters.clear()

    async def wait_closed(self) -> None:
        """Wait until the transport has called ``connection_lost``."""
        if self._lost:
            return
        w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lost_waiters.append(w)
        await w

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # -- writing ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(w)
        await w

    # -- reading ---------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as frames."""
        return self._unread

    def interrupt(self, error: BaseException | None) -> None:
        """Make the wait for a frame under way, or the next one, raise ``error`` once
        (None: take back one not raised yet). Frames already whole are still returned."""
        self._interrupt = error
        if error is not None:
            self._wake()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _peek_header(self) -> tuple[FrameType, int] | None:
        if self._next is not None:
            return self._next
        if self._unread < HEADER.size:
            return None
        first = self._chunks[0]
        if first[2] - first[1] >= HEADER.size:
            head = bytes(first[0][first[1]:first[1] + HEADER.size])
        else:
            head = bytes(self._gather(HEADER.size, consume=False))
        self._next = parse_header(head, self.max_frame)
        return self._next

    def _gather(self, n: int, *, consume: bool) -> bytearray:
        """The next ``n`` unread bytes, across chunks, as one new buffer."""
        out = bytearray()
        for c in self._chunks:
            take = min(n - len(out), c[2] - c[1])
            out += memoryview(c[0])[c[1]:c[1] + take]
            if len(out) == n:
                break
        if consume:
            self._consume(n)
        return out

    def _consume(self, n: int) -> None:
        self._unread -= n
        while n:
            c = self._chunks[0]
            take = min(n, c[2] - c[1])
            c[1] += take
            n -= take
            if c[1] == c[2] and (c[0] is not self._tail or c[2] == len(self._tail)):
                self._chunks.popleft()
        if self._paused and self._unread < self.high_water // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def pop(self) -> RawFrame | None:
        """The next whole frame already received, or None. Raises ProtocolError."""
        head = self._peek_header()
        if head is None:
            return None
        t, length = head
        size = HEADER.size + length
        if self._unread < size:
            return None
        self._next = None
        first = self._chunks[0]
        start = first[1]
        if first[2] - start >= size:
            buf = first[0]
            self._consume(size)
            return RawFrame(t, buf, start, start + size)
        return RawFrame(t, self._gather(size, consume=True), 0, size)

    async def next_frame(self, timeout: float) -> RawFrame:
        """The next whole frame, waiting at most ``timeout`` seconds for it to be whole."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.pop()
            if f is not None:
                return f
            if self._interrupt is not None:
                e, self._interrupt = self._interrupt, None
                raise e
            if self._error is not None:
                raise ConnectionResetError(str(self._error) or "connection lost")
            if self._eof:
                if self._unread:
                    raise ProtocolError("truncated", "connection closed in the middle of a frame")
                raise ConnectionResetError("peer closed the connection")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError("timeout", f"no complete frame within {timeout:g}s")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(left):
                    await self._waiter
            except TimeoutError:
                raise ProtocolError("timeout",
                                    f"no complete frame within {timeout:g}s") from None
            finally:
                self._waiter = None

    async def linger(self, quiet: float = 0.2, limit: float = 2.0) -> None:
        """Before closing after an error: read and drop what the peer still sends, until
        it closes, falls quiet for ``quiet`` seconds, or ``limit`` seconds pass. Closing
        with unread data would reset the connection, and a reset can destroy the error
        frame on its way to the peer."""
        self._discarding = True
        self._chunks.clear()
        self._unread = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        deadline = time.monotonic() + limit
        while not self._eof:
            left = min(quiet, deadline - time.monotonic())
            if left <= 0:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(left):
                    await self._waiter
            except TimeoutError:
                return
            finally:
                self._waiter = None

    async def read_frame(self, timeout: float) -> Frame:
        """Like ``wire.read_frame``: one frame with its own payload copy."""
        return (await self.next_frame(timeout)).frame()
