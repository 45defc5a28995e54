"""A small blocking NBD client: what the libvirt tracker needs of a pull-mode backup.

libvirt's pull-mode backup (``virsh backup-begin``) exports each disk, as it was when
the backup began, over NBD on a unix socket, with the changed blocks since a checkpoint
as the ``qemu:dirty-bitmap:backup-<disk>`` metadata context. This client speaks the
fixed newstyle handshake with structured replies, negotiates metadata contexts, asks
for block status and reads; nothing else (no TLS: the socket is local and private).
Every reply is checked against what was asked; anything else raises ``NbdError``.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_FLAG_ERROR = 1 << 31
INFO_EXPORT = 0
CMD_READ, CMD_DISC, CMD_BLOCK_STATUS = 0, 2, 7
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR_BIT = 1 << 15
MAX_REQUEST = 32 << 20  # QEMU's largest read
MAX_PAYLOAD = MAX_REQUEST + (1 << 16)  # a reply larger than any we ask for is refused
STATE_HOLE = 1  # base:allocation: unallocated (reads as zero with STATE_ZERO)
STATE_ZERO = 2
STATE_DIRTY = 1  # qemu:dirty-bitmap:*: written since the checkpoint


class NbdError(Exception):
    """The server answered something else than the protocol allows, or an error."""


class NbdClient:
    """One connection to one export of an NBD server on a unix socket.

    ``contexts``: the metadata contexts to negotiate (``base:allocation``,
    ``qemu:dirty-bitmap:...``); each one the server does not offer is missing from
    ``context_ids``. ``timeout``: seconds for any one socket operation."""

    def __init__(self, path: str, export: str, contexts: tuple[str, ...] = (),
                 timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.size = 0
        self.context_ids: dict[str, int] = {}
        self._cookie = 0
        try:
            self.sock.connect(path)
            self._handshake(export, contexts)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(min(n - len(buf), 1 << 20))
            if not part:
                raise NbdError("the NBD server closed the connection")
            buf += part
        return bytes(buf)

    def _option(self, option: int, data: bytes) -> Iterator[tuple[int, bytes]]:
        """Send an option and yield its replies up to the ACK (not included)."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            if magic != OPT_REPLY_MAGIC or opt != option or length > MAX_PAYLOAD:
                raise NbdError(f"bad reply to option {option}")
            payload = self._recv(length)
            if rtype & REP_FLAG_ERROR:
                raise NbdError(f"option {option} refused ({rtype & ~REP_FLAG_ERROR}): "
                               f"{payload.decode(errors='replace')}")
            if rtype == REP_ACK:
                return
            yield rtype, payload

    def _handshake(self, export: str, contexts: tuple[str, ...]) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("not a fixed newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        for _ in self._option(OPT_STRUCTURED_REPLY, b""):
            pass
        name = export.encode()
        if contexts:
            data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
            for c in contexts:
                data += struct.pack(">I", len(c)) + c.encode()
            for rtype, payload in self._option(OPT_SET_META_CONTEXT, data):
                if rtype == REP_META_CONTEXT and len(payload) >= 4:
                    (cid,) = struct.unpack(">I", payload[:4])
                    self.context_ids[payload[4:].decode()] = cid
        for rtype, payload in self._option(OPT_GO, struct.pack(">I", len(name)) + name
                                           + struct.pack(">H", 0)):
            if rtype == REP_INFO and len(payload) >= 12:
                (info,) = struct.unpack(">H", payload[:2])
                if info == INFO_EXPORT:
                    self.size, _ = struct.unpack(">QH", payload[2:12])

    def _request(self, cmd: int, offset: int, length: int) -> int:
        self._cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self._cookie,
                                      offset, length))
        return self._cookie

    def _chunks(self, cookie: int) -> Iterator[tuple[int, bytes]]:
        """The reply chunks (type, payload) of request ``cookie``; errors raise."""
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, got = struct.unpack(">IQ", self._recv(12))
                if got != cookie:
                    raise NbdError("a reply to another request")
                if error:
                    raise NbdError(f"the NBD server answered error {error}")
                return
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdError(f"bad reply magic {magic:#x}")
            flags, ctype, got, length = struct.unpack(">HHQI", self._recv(16))
            if got != cookie or length > MAX_PAYLOAD:
                raise NbdError("a reply to another request, or too large")
            payload = self._recv(length)
            if ctype & CHUNK_ERROR_BIT:
                error = struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else 0
                raise NbdError(f"the NBD server answered error {error}: "
                               f"{payload[6:].decode(errors='replace')}")
            if ctype != CHUNK_NONE:
                yield ctype, payload
            if flags & REPLY_FLAG_DONE:
                return

    def block_status(self, context: str, offset: int, length: int
                     ) -> list[tuple[int, int, int]]:
        """``(offset, length, flags)`` extents of ``context`` from ``offset`` on, covering
        at least part of ``length`` bytes (ask again from where they end)."""
        cid = self.context_ids.get(context)
        if cid is None:
            raise NbdError(f"the NBD server does not offer {context}")
        cookie = self._request(CMD_BLOCK_STATUS, offset, min(length, 1 << 30))
        out: list[tuple[int, int, int]] = []
        for ctype, payload in self._chunks(cookie):
            if ctype != CHUNK_BLOCK_STATUS or len(payload) < 4:
                raise NbdError(f"unexpected chunk {ctype} in a block status reply")
            if struct.unpack(">I", payload[:4])[0] != cid:
                continue
            pos = offset
            for i in range(4, len(payload) - 7, 8):
                ln, fl = struct.unpack(">II", payload[i:i + 8])
                out.append((pos, ln, fl))
                pos += ln
        if not out or out[0][1] == 0:
            raise NbdError(f"no block status for {context} at {offset}")
        return out

    def extents(self, context: str) -> Iterator[tuple[int, int, int]]:
        """Every extent of ``context`` over the whole export."""
        pos = 0
        while pos < self.size:
            for off, ln, fl in self.block_status(context, pos, self.size - pos):
                ln = min(ln, self.size - off)
                yield off, ln, fl
                pos = off + ln

    def read(self, offset: int, length: int) -> Iterator[tuple[int, bytes | None]]:
        """``(offset, data)`` pieces of ``length`` bytes from ``offset`` (at most
        ``MAX_REQUEST``); None for a hole (zeros). The pieces may come in any order."""
        if length > MAX_REQUEST:
            raise ValueError("read at most MAX_REQUEST bytes at a time")
        cookie = self._request(CMD_READ, offset, length)
        for ctype, payload in self._chunks(cookie):
            if ctype == CHUNK_OFFSET_DATA and len(payload) >= 8:
                (at,) = struct.unpack(">Q", payload[:8])
                if not offset <= at <= at + len(payload) - 8 <= offset + length:
                    raise NbdError("read data outside the range asked for")
                yield at, payload[8:]
            elif ctype == CHUNK_OFFSET_HOLE and len(payload) == 12:
                at, ln = struct.unpack(">QI", payload)
                if not offset <= at <= at + ln <= offset + length:
                    raise NbdError("a hole outside the range asked for")
                yield at, None
            else:
                raise NbdError(f"unexpected chunk {ctype} in a read reply")
