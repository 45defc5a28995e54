"""A listening TLS context that serves a certificate file replaced while it runs.

``watch(ctx, certfile, load)`` installs an SNI callback on ``ctx`` (OpenSSL calls it for
every handshake, with or without a server name). It compares the certificate file's
identity (inode, size, mtime) with the one it last loaded; when the file changed it
builds a new context with ``load()`` and switches this and every later connection to
it. A file caught half-written (a key that does not match yet) is retried at the next
handshake. So a listener whose certificate is renewed or replaced after a revocation
needs no restart.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

import structlog

log = structlog.get_logger("tls")


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class _Watcher:
    def __init__(self, ctx: ssl.SSLContext, certfile: str,
                 load: Callable[[], ssl.SSLContext]) -> None:
        self.ctx, self.certfile, self.load = ctx, certfile, load
        self.signature = _signature(certfile)
        self.current = ctx

    def __call__(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                 _ctx: ssl.SSLContext) -> None:
        signature = _signature(self.certfile)
        if signature is not None and signature != self.signature:
            try:
                self.current = self.load()
                self.signature = signature
                log.info("tls_certificate_loaded", cert=self.certfile)
            except (OSError, ssl.SSLError) as e:  # half-written: try at the next one
                log.warning("tls_certificate_unloadable", cert=self.certfile, error=str(e))
        if self.current is not self.ctx:
            conn.context = self.current


def watch(ctx: ssl.SSLContext, certfile: str, load: Callable[[], ssl.SSLContext]) -> None:
    """Serve the current ``certfile`` through ``ctx``: once the file is replaced, new
    connections get a context from ``load()`` (which must load that file)."""
    ctx.sni_callback = _Watcher(ctx, certfile, load)
