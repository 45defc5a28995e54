"""Who is calling on the site listener: a machine's verified client certificate."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from configserver import db
from configserver.certs import trusted
from configserver.core import Core

log = structlog.get_logger("configserver.peer")


def peer_certificate(request: web.Request) -> tuple[str, str] | None:
    """(common name, serial) of the client certificate TLS verified, or None."""
    ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
    cert: dict[str, Any] | None = ssl_obj.getpeercert() if ssl_obj is not None else None
    if not cert:
        return None
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
    serial = str(cert.get("serialNumber", "")).lower().lstrip("0")
    if not cn or not serial:
        return None
    return str(cn), serial


async def verify_peer(core: Core, request: web.Request) -> str | None:
    """The machine name of the caller's certificate, or None.

    The TLS layer already checked the chain to our CA and the validity dates; here a
    certificate also has to be one we issued to that machine, unrevoked, for a machine
    that exists and is enabled (``certs.trusted``).
    """
    peer = peer_certificate(request)
    if peer is None:
        return None
    cn, serial = peer
    async with core.sessionmaker() as s:
        row = await s.get(db.Certificate, serial)
        machine = await s.get(db.Machine, cn)
    reason = "wrong_subject" if row is not None and row.subject != cn else \
        trusted(row, machine, core.clock())
    if reason is not None:
        log.warning("agent_certificate_refused", machine=cn, serial=serial, reason=reason,
                    peer=request.remote)
        return None
    return cn
