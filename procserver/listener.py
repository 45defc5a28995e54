"""Port 9443: accepting agents' connections, their TLS handshakes, and their sessions.

Accepting is ours and the TLS handshake is started per connection: connections that
have not finished it are counted and capped (``max_handshakes`` in all,
``max_handshakes_per_host`` from one address) before any TLS work is done for them,
and a handshake must end within ``handshake_timeout_seconds``. At most
``max_sessions`` sessions run at once; one more is told ``busy``. A session's error
ends that session only (``session_rejected`` / ``session_lost`` / ``session_failed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import structlog

from common import certwatch
from common.logthrottle import LogThrottle
from common.tls import server_context
from procserver.framestream import FrameStream
from procserver.metrics import ProcMetrics
from procserver.recvbuffers import ReceiveBuffers
from procserver.session import Session
from wire.protocol import ProtocolError, error_frame

log = structlog.get_logger("procserver")

# Receive buffering per connection: reading pauses once this much waits to be parsed.
RECV_CHUNK = 256 << 10
RECV_HIGH_WATER = 512 << 10
# Refused TLS handshakes are logged at most once per peer address per this many seconds.
HANDSHAKE_LOG_INTERVAL = 60.0


def server_ssl_context(tls_ca: str, tls_cert: str, tls_key: str) -> ssl.SSLContext:
    """Mutual TLS: a client certificate from our CA is required; AEAD suites only. A
    certificate file replaced while we run (renewed, or after a revocation) is served
    from the next handshake on (``common.certwatch``)."""

    def load() -> ssl.SSLContext:
        return server_context(cafile=tls_ca, certfile=tls_cert, keyfile=tls_key,
                              verify_mode=ssl.CERT_REQUIRED)

    ctx = load()
    certwatch.watch(ctx, tls_cert, load)
    return ctx


def peer_machine(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> str | None:
    """The machine a client certificate was issued to (its common name)."""
    cert = writer.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host`` (every address it resolves to) and ``port``."""
    out: list[socket.socket] = []
    try:
        for family, type_, proto, _name, addr in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            if out and port == 0:
                break  # one ephemeral port cannot be shared across addresses
            sock = socket.socket(family, type_, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


@dataclass(frozen=True)
class ListenerLimits:
    max_handshakes: int
    max_handshakes_per_host: int
    handshake_timeout: float
    max_sessions: int
    max_frame: int


SessionFactory = Callable[[FrameStream, str, str], Session]


class Listener:
    """Turns accepted connections into sessions (``make_session(stream, machine, peer)``),
    each run as work of ``spawn`` so that shutdown waits for it."""

    def __init__(self, limits: ListenerLimits, tls: ssl.SSLContext, metrics: ProcMetrics,
                 buffers: ReceiveBuffers, make_session: SessionFactory,
                 spawn: Callable[[Coroutine[Any, Any, None]], Any]) -> None:
        self.limits, self.tls, self.metrics = limits, tls, metrics
        self.buffers, self.make_session, self.spawn = buffers, make_session, spawn
        self._sessions = asyncio.Semaphore(limits.max_sessions)
        self._handshakes = 0  # TCP connections accepted whose TLS handshake is not done
        self._handshakes_by_host: Counter[str] = Counter()
        # one line per peer per minute for refused handshakes (the metric counts them all)
        self.handshake_log = LogThrottle(HANDSHAKE_LOG_INTERVAL)

    async def accept_loop(self, listener: socket.socket) -> None:
        """Accept connections on ``listener`` until cancelled."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as e:  # EMFILE and friends: do not spin
                log.warning("accept_failed", error=str(e))
                await asyncio.sleep(0.1)
                continue
            host = str(addr[0]) if isinstance(addr, tuple) and addr else "?"
            if self._handshakes >= limits.max_handshakes or \
                    self._handshakes_by_host[host] >= limits.max_handshakes_per_host:
                self.metrics.rejected_handshakes.labels("busy").inc()
                self._log_rejected(host, "busy", "too many TLS handshakes in progress")
                sock.close()
                continue
            self._handshakes += 1
            self._handshakes_by_host[host] += 1
            self.metrics.handshakes.set(self._handshakes)
            self.spawn(self._connection(sock, host))

    async def _connection(self, sock: socket.socket, host: str) -> None:
        timeout = self.limits.handshake_timeout
        transport: asyncio.BaseTransport | None = None
        stream = FrameStream(chunk=RECV_CHUNK, high_water=RECV_HIGH_WATER,
                             max_frame=self.limits.max_frame)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                # (uvloop returns its TLS protocol as the second item, not ours)
                transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: stream, sock, ssl=self.tls, ssl_handshake_timeout=timeout + 1)
        except TimeoutError:
            self.metrics.rejected_handshakes.labels("timeout").inc()
            self._log_rejected(host, "timeout", f"no TLS handshake within {timeout:g}s")
        except (OSError, ssl.SSLError, ConnectionError) as e:
            self.metrics.rejected_handshakes.labels("failed").inc()
            self._log_rejected(host, "failed", str(e) or type(e).__name__)
        finally:
            self._handshakes -= 1
            self._handshakes_by_host[host] -= 1
            if self._handshakes_by_host[host] <= 0:
                del self._handshakes_by_host[host]
            self.metrics.handshakes.set(self._handshakes)
        if transport is None:
            with contextlib.suppress(OSError):
                sock.close()
            return
        self.buffers.streams.add(stream)
        try:
            await self._handle(stream, cast(asyncio.Transport, transport))
        finally:
            self.buffers.streams.discard(stream)

    def _log_rejected(self, host: str, reason: str, error: str) -> None:
        suppressed = self.handshake_log.admit(host)
        if suppressed is not None:
            log.warning("tls_handshake_rejected", peer=host, reason=reason, error=error,
                        suppressed=suppressed)

    async def _handle(self, stream: FrameStream, transport: asyncio.Transport) -> None:
        machine = peer_machine(transport)
        try:
            if machine is None:  # cannot happen with CERT_REQUIRED, kept as a guard
                return
            if self._sessions.locked():
                self.metrics.rejected.labels("busy").inc()
                with contextlib.suppress(ConnectionError, TimeoutError):
                    stream.write(error_frame("busy", "too many sessions", "retry later"))
                    await asyncio.wait_for(stream.drain(), 5)
                return
            async with self._sessions:
                self.metrics.sessions.inc()
                session = self.make_session(stream, machine,
                                            str(transport.get_extra_info("peername")))
                try:
                    await session.run()
                except ProtocolError as e:
                    self.metrics.rejected.labels(e.code).inc()
                    session.log.warning("session_rejected", code=e.code, error=str(e))
                    await _refuse(stream, e.code, str(e))
                except (ConnectionError, ssl.SSLError, TimeoutError) as e:
                    session.log.info("session_lost", error=str(e) or type(e).__name__)
                except Exception as e:  # a bug or a failing database: end this session only
                    self.metrics.rejected.labels("internal_error").inc()
                    session.log.error("session_failed", error=str(e) or type(e).__name__,
                                      error_type=type(e).__name__)
                    await _refuse(stream, "internal_error",
                                  f"the process server failed: {type(e).__name__}: {e}")
                finally:
                    self.metrics.sessions.dec()
        finally:
            transport.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.wait_closed(), 5)


async def _refuse(stream: FrameStream, code: str, message: str) -> None:
    """Send ERROR, then let the peer read it before the connection closes."""
    with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
        stream.write(error_frame(code, message))
        await asyncio.wait_for(stream.drain(), 5)
        await stream.linger()
