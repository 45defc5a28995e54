"""The NBD protocol's numbers and wire structures (newstyle fixed handshake, simple and
structured replies), as the protocol document (``doc/proto.md`` of the NBD project)
defines them. Everything is big-endian.

Handshake::

    server: "NBDMAGIC" | "IHAVEOPT" | u16 handshake flags
    client: u32 client flags
    client: "IHAVEOPT" | u32 option | u32 length | data          (repeated)
    server: u64 REPLY_MAGIC | u32 option | u32 reply type | u32 length | data

Transmission::

    request:  u32 REQUEST_MAGIC | u16 flags | u16 type | u64 cookie | u64 offset | u32 length
    simple:   u32 SIMPLE_MAGIC | u32 error | u64 cookie | [data]
    chunk:    u32 STRUCTURED_MAGIC | u16 flags | u16 type | u64 cookie | u32 length | payload
"""

from __future__ import annotations

import errno
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# Commands and their flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply chunk types and flags.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1

# base:allocation states.
META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# Errors sent in replies (the protocol's values are Linux's errno numbers).
EPERM = errno.EPERM
EIO = errno.EIO
EINVAL = errno.EINVAL
ENOSPC = errno.ENOSPC
EOVERFLOW = errno.EOVERFLOW
ENOTSUP = errno.EOPNOTSUPP
ESHUTDOWN = errno.ESHUTDOWN

# Limits: what a request may carry, what an option may be, the longest name.
MAX_PAYLOAD = 32 << 20
MAX_OPTION = 64 << 10
MAX_NAME = 4096

OPTION_HEAD = struct.Struct(">QII")
OPTION_REPLY_HEAD = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEAD = struct.Struct(">IHHQI")


def greeting() -> bytes:
    """What the server sends first: the magics and its handshake flags."""
    return NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEAD.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes, *, done: bool = True) -> bytes:
    return CHUNK_HEAD.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind,
                           cookie, len(payload)) + payload


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:4096]
    return chunk(cookie, REPLY_TYPE_ERROR, struct.pack(">IH", error, len(msg)) + msg)


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """One BLOCK_STATUS chunk (the last of its reply): ``(length, flags)`` descriptors."""
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f)
                                                    for n, f in extents)
    return chunk(cookie, REPLY_TYPE_BLOCK_STATUS, body)


class ProtocolViolation(Exception):
    """The peer broke the protocol in a way that cannot be answered: the connection
    must be dropped (a bad magic, an unknown client flag, a truncated message)."""
