"""The site listener's TLS socket: aiohttp's ``TCPSite``, with each handshake done here so
that a refused one is logged with the peer's address (rate-limited: one line per peer
per ``HANDSHAKE_LOG_INTERVAL``, counting the ones held back). With ``ssl=`` on the
server, asyncio drops a failed handshake without a word outside debug mode.

Per connection: accept plain TCP, stop reading, upgrade with ``loop.start_tls`` (which
reads on from where the kernel buffered the ClientHello), then hand the TLS transport
to aiohttp's protocol exactly as ``create_server(ssl=...)`` would.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import structlog
from aiohttp import web

from common.logthrottle import LogThrottle

log = structlog.get_logger("configserver")

HANDSHAKE_TIMEOUT_SECONDS = 10.0
HANDSHAKE_LOG_INTERVAL = 60.0


class _Handshake(asyncio.Protocol):
    """The protocol of a connection until its TLS handshake ends."""

    def __init__(self, site: LoggingTLSSite) -> None:
        self.site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello waits in the kernel for start_tls
        task = asyncio.get_running_loop().create_task(self.site.upgrade(transport))
        self.site.handshakes.add(task)
        task.add_done_callback(self.site.handshakes.discard)


class LoggingTLSSite(web.TCPSite):
    """A ``TCPSite`` whose refused TLS handshakes are logged (``tls_handshake_rejected``
    with ``listener``, ``peer``, ``error``, ``suppressed``)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext, listener: str = "site") -> None:
        super().__init__(runner, host, port)
        self.tls, self.listener = ssl_context, listener
        self.handshake_log = LogThrottle(HANDSHAKE_LOG_INTERVAL)
        self.handshakes: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return super().name.replace("http://", "https://", 1)

    async def start(self) -> None:
        self._runner._reg_site(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Handshake(self), self._host,
                                                self._port, backlog=self._backlog)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        for task in list(self.handshakes):  # unfinished handshakes: nobody to serve now
            task.cancel()
        for task in list(self.handshakes):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def upgrade(self, transport: asyncio.Transport) -> None:
        """TLS on ``transport``, then aiohttp's request handling; a refusal is logged."""
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        server = self._runner.server
        assert server is not None
        app = server()
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(transport, app, self.tls, server_side=True,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS)
        except asyncio.CancelledError:
            transport.abort()
            raise
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as e:
            transport.abort()
            suppressed = self.handshake_log.admit(host)
            if suppressed is not None:
                log.warning("tls_handshake_rejected", listener=self.listener, peer=host,
                            error=str(e) or type(e).__name__, suppressed=suppressed)
            return
        if tls is None:  # the peer went away as the handshake ended
            transport.abort()
            return
        app.connection_made(tls)
