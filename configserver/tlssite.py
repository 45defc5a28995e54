"""The site listener's TLS socket: an aiohttp site whose TLS handshakes are done here, so
that a refused one is logged with the peer's address (rate-limited: one line per peer
per ``HANDSHAKE_LOG_INTERVAL``, counting the ones held back). With ``ssl=`` on
``create_server``, the event loop drops a failed handshake without a word outside debug
mode.

Per connection: accept the plain socket, then ``loop.connect_accepted_socket`` with the
TLS context and aiohttp's protocol factory, which does the handshake and hands the TLS
transport to aiohttp as ``create_server(ssl=...)`` would. (The way the process server's
listener does it, and one that works on uvloop, the daemons' loop: upgrading a
transport of ``create_server`` with ``loop.start_tls`` does not, there.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import structlog
from aiohttp import web

from common.logthrottle import LogThrottle

log = structlog.get_logger("configserver")

HANDSHAKE_TIMEOUT_SECONDS = 10.0
HANDSHAKE_LOG_INTERVAL = 60.0


class LoggingTLSSite(web.TCPSite):
    """A ``TCPSite`` whose refused TLS handshakes are logged (``tls_handshake_rejected``
    with ``listener``, ``peer``, ``error``, ``suppressed``)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext, listener: str = "site") -> None:
        super().__init__(runner, host, port)
        self.tls, self.listener = ssl_context, listener
        self.handshake_log = LogThrottle(HANDSHAKE_LOG_INTERVAL)
        self.handshakes: set[asyncio.Task[None]] = set()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return super().name.replace("http://", "https://", 1)

    async def start(self) -> None:
        self._runner._reg_site(self)
        host = self._host or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, self._port), family=family,
                                    backlog=self._backlog)
        sock.setblocking(False)
        self._sock = sock
        self._bound_port = sock.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept(sock))

    async def stop(self) -> None:
        self._runner._check_site(self)
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._sock is not None:
            self._sock.close()
        for task in list(self.handshakes):  # unfinished handshakes: nobody to serve now
            task.cancel()
        for task in list(self.handshakes):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._runner._unreg_site(self)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as e:  # EMFILE and friends: do not spin
                log.warning("accept_failed", listener=self.listener, error=str(e))
                await asyncio.sleep(0.1)
                continue
            host = str(addr[0]) if isinstance(addr, tuple) and addr else "?"
            task = loop.create_task(self.upgrade(sock, host))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)

    async def upgrade(self, sock: socket.socket, host: str) -> None:
        """TLS on ``sock``, then aiohttp's request handling; a refusal is logged."""
        server = self._runner.server
        assert server is not None
        try:
            sock.setblocking(False)
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_SECONDS + 1):
                await asyncio.get_running_loop().connect_accepted_socket(
                    server, sock, ssl=self.tls,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS)
        except asyncio.CancelledError:
            sock.close()
            raise
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as e:
            with contextlib.suppress(OSError):
                sock.close()
            suppressed = self.handshake_log.admit(host)
            if suppressed is not None:
                log.warning("tls_handshake_rejected", listener=self.listener, peer=host,
                            error=str(e) or type(e).__name__, suppressed=suppressed)
