"""The transmission phase: requests in, replies out, for one connection.

Requests are read in order and served concurrently (at most MAX_INFLIGHT at once, so
memory stays bounded: each carries at most MAX_PAYLOAD bytes); each reply is written
whole, so replies of different requests never interleave. With structured replies
negotiated, READ and BLOCK_STATUS are answered with chunks (an error as an ERROR
chunk), other commands with simple replies.

A request that can be answered gets the protocol's error if it is wrong (EINVAL for an
unknown command, a bad flag or a range beyond the disk, EOVERFLOW for a payload over
MAX_PAYLOAD, whose data is skipped) and the connection goes on. A request that cannot
be answered (a bad magic, a truncated request) drops the connection. DISC waits for the
requests in flight, then closes.
"""

from __future__ import annotations

import asyncio
import struct

import structlog

from instant import protocol as p
from instant.export import Export, ExportError
from instant.handshake import Session, read_exactly, skip

log = structlog.get_logger("instant.nbd")

MAX_INFLIGHT = 8
PAYLOAD_TIMEOUT = 60.0  # a request's data must follow its header within this
_KNOWN = (p.CMD_READ, p.CMD_WRITE, p.CMD_DISC, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_WRITE_ZEROES,
          p.CMD_BLOCK_STATUS)
_ALL_FLAGS = (p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_DF | p.CMD_FLAG_REQ_ONE
              | p.CMD_FLAG_FAST_ZERO)


class _Refused(Exception):
    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


async def serve_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        session: Session) -> None:
    """Serve requests until DISC, the client's close, or a violation (raised)."""
    sem = asyncio.Semaphore(MAX_INFLIGHT)
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                head = await reader.readexactly(p.REQUEST.size)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise p.ProtocolViolation("the client closed mid-request") from None
                return  # closed between requests: a client that just went away
            magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(head)
            if magic != p.REQUEST_MAGIC:
                raise p.ProtocolViolation(f"bad request magic {magic:#x}")
            if cmd == p.CMD_DISC:
                return
            data = b""
            if cmd == p.CMD_WRITE:
                if length > p.MAX_PAYLOAD:
                    await skip(reader, length, PAYLOAD_TIMEOUT)
                    _send(writer, session, cmd, cookie,
                          _Refused(p.EOVERFLOW, f"write of {length} bytes is over the "
                                                f"{p.MAX_PAYLOAD} byte limit"))
                    await writer.drain()
                    continue
                data = await read_exactly(reader, length, PAYLOAD_TIMEOUT)
            await sem.acquire()
            t = asyncio.create_task(_serve_one(writer, session, sem, flags, cmd, cookie,
                                               offset, length, data))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    finally:
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _serve_one(writer: asyncio.StreamWriter, session: Session, sem: asyncio.Semaphore,
                     flags: int, cmd: int, cookie: int, offset: int, length: int,
                     data: bytes) -> None:
    try:
        result: bytes | list[tuple[int, int]] | _Refused | None
        try:
            result = await _dispatch(session, flags, cmd, offset, length, data)
        except _Refused as e:
            result = e
        except ExportError as e:
            result = _Refused(e.errno, str(e))
        except Exception as e:  # every other failure of a request is an EIO reply
            log.warning("nbd_request_failed", export=session.name, command=cmd,
                        offset=offset, length=length, error=str(e))
            result = _Refused(p.EIO, str(e))
        _send(writer, session, cmd, cookie, result, offset)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the client went away; the reader loop sees it too
    finally:
        sem.release()


def _send(writer: asyncio.StreamWriter, session: Session, cmd: int, cookie: int,
          result: bytes | list[tuple[int, int]] | _Refused | None, offset: int = 0) -> None:
    chunked = session.structured and cmd in (p.CMD_READ, p.CMD_BLOCK_STATUS)
    if isinstance(result, _Refused):
        writer.write(p.error_chunk(cookie, result.errno, str(result)) if chunked
                     else p.simple_reply(cookie, result.errno))
    elif cmd == p.CMD_READ:
        assert isinstance(result, bytes)
        writer.write(p.chunk(cookie, p.REPLY_TYPE_OFFSET_DATA,
                             struct.pack(">Q", offset) + result) if chunked
                     else p.simple_reply(cookie, 0, result))
    elif cmd == p.CMD_BLOCK_STATUS:
        assert isinstance(result, list) and session.meta_context is not None
        writer.write(p.block_status_chunk(cookie, session.meta_context, result))
    else:
        writer.write(p.simple_reply(cookie))


async def _dispatch(session: Session, flags: int, cmd: int, offset: int, length: int,
                    data: bytes) -> bytes | list[tuple[int, int]] | None:
    export: Export = session.export
    if cmd not in _KNOWN:
        raise _Refused(p.EINVAL, f"unknown command {cmd}")
    if flags & ~_ALL_FLAGS:
        raise _Refused(p.EINVAL, f"unknown command flags {flags:#x}")
    if flags & p.CMD_FLAG_DF and (cmd != p.CMD_READ or not session.structured):
        raise _Refused(p.EINVAL, "DF is for READ with structured replies")
    if flags & p.CMD_FLAG_REQ_ONE and cmd != p.CMD_BLOCK_STATUS:
        raise _Refused(p.EINVAL, "REQ_ONE is for BLOCK_STATUS")
    if flags & (p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO) and cmd != p.CMD_WRITE_ZEROES:
        raise _Refused(p.EINVAL, "NO_HOLE and FAST_ZERO are for WRITE_ZEROES")
    if cmd == p.CMD_FLUSH:
        if offset or length:
            raise _Refused(p.EINVAL, "FLUSH takes no range")
        await export.flush()
        return None
    if offset + length > export.size:
        raise _Refused(p.ENOSPC if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL,
                       f"range {offset}+{length} lies beyond the disk's {export.size} bytes")
    fua = bool(flags & p.CMD_FLAG_FUA)
    if cmd == p.CMD_READ:
        if length > p.MAX_PAYLOAD:
            raise _Refused(p.EINVAL, f"read of {length} bytes is over the "
                                     f"{p.MAX_PAYLOAD} byte limit")
        return await export.read(offset, length)
    if cmd == p.CMD_WRITE:
        await export.write(offset, data, fua=fua)
        return None
    if cmd == p.CMD_WRITE_ZEROES:
        if flags & p.CMD_FLAG_FAST_ZERO:
            raise _Refused(p.ENOTSUP, "zeroing here is not faster than writing")
        await export.write_zeroes(offset, length, fua=fua)
        return None
    if cmd == p.CMD_TRIM:
        await export.trim(offset, length)
        return None
    # BLOCK_STATUS
    if session.meta_context is None or not session.structured:
        raise _Refused(p.EINVAL, "BLOCK_STATUS needs base:allocation set first")
    if length == 0:
        raise _Refused(p.EINVAL, "BLOCK_STATUS needs a non-zero length")
    extents = await export.extents(offset, length)
    return extents[:1] if flags & p.CMD_FLAG_REQ_ONE else extents
