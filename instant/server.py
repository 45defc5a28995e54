"""``NbdServer``: serves exports over a UNIX socket (and, if asked, TCP on loopback).

Each connection runs the handshake (handshake.py), then the transmission phase
(transmission.py). A connection that breaks the protocol is dropped and logged; the
others go on. ``stop`` stops accepting, lets the connections' requests in flight
finish, closes the connections and removes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import stat
from collections.abc import Mapping

import structlog

from instant import protocol as p
from instant.export import Export
from instant.handshake import HANDSHAKE_TIMEOUT, negotiate
from instant.transmission import serve_session

log = structlog.get_logger("instant.nbd")

STOP_GRACE = 10.0  # seconds the requests in flight get to finish at stop


class SocketInUse(Exception):
    """The socket path is taken."""


async def _clear_stale_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; give another --socket")
    try:
        _r, w = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
    except (OSError, TimeoutError):
        os.unlink(path)  # left by a server that was killed: no one listens
        return
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    raise SocketInUse(f"a server already listens on {path}; stop it or give another "
                      "--socket")


class NbdServer:
    def __init__(self, exports: Mapping[str, Export], *, socket_path: str,
                 tcp_port: int | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 socket_owner: tuple[int, int] | None = None) -> None:
        """``exports`` maps export names to exports; ``""`` is the default export (the
        one ``nbd+unix:///?socket=PATH`` names). ``tcp_port`` (0: any free port) also
        listens on 127.0.0.1. The socket is mode 0600, owned by ``socket_owner`` (uid,
        gid) when given: the one user that may connect (an emulator running as its own
        user), else by this process's user."""
        self.exports = dict(exports)
        self.socket_path = socket_path
        self.tcp_port = tcp_port
        self.handshake_timeout = handshake_timeout
        self.socket_owner = socket_owner
        self._servers: list[asyncio.Server] = []
        self._conns: dict[int, tuple[asyncio.Task[None], asyncio.StreamWriter]] = {}
        self._ids = itertools.count(1)
        self._sessions = 0  # connections past their handshake
        self._sessions_changed = asyncio.Condition()

    @property
    def uri(self) -> str:
        """The NBD URI of the default export."""
        return f"nbd+unix:///?socket={self.socket_path}"

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        for s in self._servers:
            for sock in s.sockets:
                addr = sock.getsockname()
                if isinstance(addr, tuple):
                    return addr[0], addr[1]
        return None

    @property
    def sessions(self) -> int:
        """Connections past their handshake, now."""
        return self._sessions

    async def wait_session(self) -> None:
        """Return once a client has a session (at once if one has): an emulator that
        lost its server reconnects when it sees the socket again."""
        async with self._sessions_changed:
            await self._sessions_changed.wait_for(lambda: self._sessions > 0)

    async def _count_session(self, n: int) -> None:
        async with self._sessions_changed:
            self._sessions += n
            self._sessions_changed.notify_all()

    async def start(self) -> None:
        """Listen. Raises ``SocketInUse`` if ``socket_path`` is something else than a
        socket left behind by a server that died (a live server's, or not a socket)."""
        await _clear_stale_socket(self.socket_path)
        self._servers.append(await asyncio.start_unix_server(self._client,
                                                             path=self.socket_path))
        os.chmod(self.socket_path, 0o600)
        if self.socket_owner is not None:
            os.chown(self.socket_path, *self.socket_owner)
        if self.tcp_port is not None:
            self._servers.append(await asyncio.start_server(self._client, "127.0.0.1",
                                                            self.tcp_port))
        log.info("nbd_server_listening", socket=self.socket_path, tcp=self.tcp_address,
                 exports=sorted(self.exports))

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        conns = list(self._conns.values())
        for _t, w in conns:
            w.close()  # the connection's reader sees the end: it finishes what is in flight
        if conns:
            _done, late = await asyncio.wait([t for t, _w in conns], timeout=STOP_GRACE)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
            log.info("nbd_connections_closed", count=len(conns), cancelled=len(late))
        for s in self._servers:
            await s.wait_closed()
        if self._servers:  # only the socket this server made (a failed start made none)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self._servers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        cid = next(self._ids)
        task = asyncio.current_task()
        assert task is not None
        self._conns[cid] = (task, writer)
        clog = log.bind(connection=cid)
        counted = False
        try:
            session = await negotiate(reader, writer, self.exports,
                                      timeout=self.handshake_timeout)
            if session is not None:
                clog.info("nbd_client_connected", export=session.name,
                          structured=session.structured,
                          block_status=session.meta_context is not None)
                await self._count_session(1)
                counted = True
                await serve_session(reader, writer, session)
            clog.info("nbd_client_disconnected")
        except p.ProtocolViolation as e:
            clog.warning("nbd_client_dropped", reason=str(e))
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            clog.info("nbd_client_lost", reason=str(e) or type(e).__name__)
        except asyncio.CancelledError:
            # Only stop() cancels, after its grace: end quietly (the stream's callback
            # would log a cancelled handler as an error).
            clog.warning("nbd_client_cancelled")
        finally:
            self._conns.pop(cid, None)
            if counted:
                self._sessions -= 1  # no await here: a cancelled handler must get here
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
