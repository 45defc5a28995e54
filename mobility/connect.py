"""The agent's connection to the process server: TLS, HELLO and WELCOME, retried while
the server is busy."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time

import structlog

from common.backoff import Backoff
from mobility import AGENT_VERSION
from mobility.agenttls import client_ssl_context, revoked_refusal
from mobility.config import MobilityConfig
from mobility.link import Link
from wire.protocol import (
    FEATURES,
    FrameType,
    ProtocolError,
    RemoteError,
    encode_json,
    raise_if_error,
    read_frame,
)

log = structlog.get_logger("mobility")


async def connect(cfg: MobilityConfig, revocation_list: str | None) -> Link:
    """One connection: the TLS handshake (a server certificate on ``revocation_list``
    is refused), HELLO and the server's WELCOME."""
    server = f"{cfg.server_host}:{cfg.server_port}"
    try:
        async with asyncio.timeout(cfg.connect_timeout_seconds):
            reader, writer = await asyncio.open_connection(
                cfg.server_host, cfg.server_port,
                ssl=client_ssl_context(cfg, revocation_list),
                server_hostname=cfg.server_host)
    except ssl.SSLCertVerificationError as e:
        refusal = revoked_refusal(e, server)
        if refusal is None:
            raise
        log.error("server_certificate_revoked", server=server, error=str(refusal))
        raise refusal from None
    try:
        writer.write(encode_json(FrameType.HELLO, {
            "machine": cfg.machine, "agent_version": AGENT_VERSION,
            "features": list(FEATURES)}))
        welcome = await read_frame(reader, timeout=cfg.connect_timeout_seconds)
        raise_if_error(welcome)
        if welcome.type != FrameType.WELCOME:
            raise ProtocolError("expected_welcome", f"got {welcome.type.name}")
        return Link(reader, writer, welcome.json())
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 5)
        raise


async def connect_retrying(cfg: MobilityConfig, revocation_list: str | None) -> Link:
    """Connect, retrying for up to ``connect_timeout_seconds`` while the server is
    there but refuses for now: busy, or the connection reset before the TLS handshake
    ended (too many handshakes at once). Nothing listening fails at once."""
    deadline = time.monotonic() + cfg.connect_timeout_seconds
    # Jittered: many agents refused at once must not all come back in step.
    backoff = Backoff(0.05, 2.0)
    while True:
        try:
            return await connect(cfg, revocation_list)
        except (RemoteError, ConnectionResetError) as e:
            if isinstance(e, RemoteError) and e.code != "busy":
                raise
            delay = backoff.next()
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
