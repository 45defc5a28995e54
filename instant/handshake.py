"""The newstyle fixed handshake: options until the client picks an export.

Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
LIST_META_CONTEXT and SET_META_CONTEXT (``base:allocation`` only). Any other option
(STARTTLS among them) is answered NBD_REP_ERR_UNSUP and the client may go on; an option
with malformed data gets NBD_REP_ERR_INVALID; one larger than MAX_OPTION is skipped
unread and answered NBD_REP_ERR_TOO_BIG. What cannot be answered (a bad magic, an
unknown client flag, an unknown export through EXPORT_NAME) drops the connection.
Every read has a timeout: a client that stalls in the handshake is dropped.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from instant import protocol as p
from instant.export import Export

HANDSHAKE_TIMEOUT = 30.0
CONTEXT_ID = 1  # the id of base:allocation, the one context served
TRANSMISSION_FLAGS = (p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_SEND_TRIM
                      | p.FLAG_SEND_WRITE_ZEROES | p.FLAG_CAN_MULTI_CONN)


def transmission_flags(structured: bool) -> int:
    """The export's flags; DF (reads never split) only with structured replies."""
    return TRANSMISSION_FLAGS | (p.FLAG_SEND_DF if structured else 0)


@dataclass
class Session:
    """What the handshake agreed: the export, and how replies are framed."""

    name: str
    export: Export
    structured: bool = False
    meta_context: int | None = None  # CONTEXT_ID once base:allocation was set


class _Invalid(Exception):
    """Malformed option data: answered NBD_REP_ERR_INVALID."""


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float | None) -> bytes:
    """``n`` bytes; ProtocolViolation if the peer stalls or closes in the middle of
    them, ConnectionResetError if it closes before the first."""
    try:
        return await asyncio.wait_for(reader.readexactly(n), timeout)
    except asyncio.IncompleteReadError as e:
        if not e.partial:  # between messages: a client that went away, not a violation
            raise ConnectionResetError("the client closed the connection") from None
        raise p.ProtocolViolation("the client closed the connection mid-message") from None
    except TimeoutError:
        raise p.ProtocolViolation(f"the client sent nothing for {timeout:.0f} s") from None


async def skip(reader: asyncio.StreamReader, n: int, timeout: float | None) -> None:
    """Read and drop ``n`` bytes in bounded pieces."""
    while n:
        got = await read_exactly(reader, min(n, 1 << 20), timeout)
        n -= len(got)


async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    exports: Mapping[str, Export], *, timeout: float = HANDSHAKE_TIMEOUT
                    ) -> Session | None:
    """Run the handshake; return the session once the client entered transmission, or
    None if it ended the handshake (ABORT). Raises ProtocolViolation to drop it (a
    client silent for ``timeout`` seconds at any step among them)."""
    writer.write(p.greeting())
    await writer.drain()
    (cflags,) = struct.unpack(">I", await read_exactly(reader, 4, timeout))
    if cflags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
        raise p.ProtocolViolation(f"unknown client flags {cflags:#x}")
    no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
    structured = False
    meta: int | None = None
    while True:
        magic, option, length = p.OPTION_HEAD.unpack(
            await read_exactly(reader, p.OPTION_HEAD.size, timeout))
        if magic != p.IHAVEOPT:
            raise p.ProtocolViolation(f"bad option magic {magic:#x}")

        def reply(kind: int, data: bytes = b"", opt: int = option) -> None:
            writer.write(p.option_reply(opt, kind, data))

        if length > p.MAX_OPTION:
            await skip(reader, length, timeout)
            reply(p.REP_ERR_TOO_BIG, b"option data too large")
            await writer.drain()
            continue
        data = await read_exactly(reader, length, timeout)
        if option == p.OPT_EXPORT_NAME:
            name = data.decode(errors="replace")
            export = exports.get(name)
            if export is None:
                raise p.ProtocolViolation(f"unknown export {name!r} (EXPORT_NAME)")
            writer.write(struct.pack(">QH", export.size, transmission_flags(structured))
                         + (b"" if no_zeroes else bytes(124)))
            await writer.drain()
            return Session(name, export, structured, meta)
        try:
            if option == p.OPT_ABORT:
                reply(p.REP_ACK)
                await writer.drain()
                return None
            if option == p.OPT_LIST:
                if data:
                    raise _Invalid("LIST takes no data")
                for name in exports:
                    raw = name.encode()
                    reply(p.REP_SERVER, struct.pack(">I", len(raw)) + raw)
                reply(p.REP_ACK)
            elif option in (p.OPT_INFO, p.OPT_GO):
                name, export = _info_request(data, exports)
                if export is None:
                    reply(p.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
                else:
                    reply(p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, export.size,
                                                  transmission_flags(structured)))
                    reply(p.REP_INFO, struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1,
                                                  min(export.block_size, p.MAX_PAYLOAD),
                                                  p.MAX_PAYLOAD))
                    reply(p.REP_ACK)
                    if option == p.OPT_GO:
                        await writer.drain()
                        return Session(name, export, structured, meta)
            elif option == p.OPT_STRUCTURED_REPLY:
                if data:
                    raise _Invalid("STRUCTURED_REPLY takes no data")
                structured = True
                reply(p.REP_ACK)
            elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                setting = option == p.OPT_SET_META_CONTEXT
                if setting and not structured:
                    raise _Invalid("SET_META_CONTEXT needs structured replies first")
                name, queries = _meta_request(data)
                if name not in exports:
                    reply(p.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
                else:
                    wanted = any(q in (p.META_BASE_ALLOCATION, "base:") for q in queries) \
                        if setting or queries else True
                    if setting:
                        meta = CONTEXT_ID if wanted else None
                    if wanted:
                        reply(p.REP_META_CONTEXT, struct.pack(">I", CONTEXT_ID)
                              + p.META_BASE_ALLOCATION.encode())
                    reply(p.REP_ACK)
            else:
                reply(p.REP_ERR_UNSUP, f"option {option} is not supported".encode())
        except _Invalid as e:
            reply(p.REP_ERR_INVALID, str(e).encode())
        await writer.drain()


def _name(data: bytes, pos: int) -> tuple[str, int]:
    if len(data) < pos + 4:
        raise _Invalid("truncated name length")
    (n,) = struct.unpack_from(">I", data, pos)
    if n > p.MAX_NAME or len(data) < pos + 4 + n:
        raise _Invalid("name longer than the option")
    try:
        return data[pos + 4:pos + 4 + n].decode(), pos + 4 + n
    except UnicodeDecodeError:
        raise _Invalid("name is not UTF-8") from None


def _info_request(data: bytes, exports: Mapping[str, Export]) -> tuple[str, Export | None]:
    name, pos = _name(data, 0)
    if len(data) < pos + 2:
        raise _Invalid("truncated information request count")
    (count,) = struct.unpack_from(">H", data, pos)
    if len(data) != pos + 2 + 2 * count:
        raise _Invalid("information requests do not match their count")
    return name, exports.get(name)


def _meta_request(data: bytes) -> tuple[str, list[str]]:
    name, pos = _name(data, 0)
    if len(data) < pos + 4:
        raise _Invalid("truncated query count")
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        q, pos = _name(data, pos)
        queries.append(q)
    if pos != len(data):
        raise _Invalid("trailing bytes after the queries")
    return name, queries
