"""Who is calling on the site listener: a machine's verified client certificate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from configserver import db

if TYPE_CHECKING:
    from configserver.server import ConfigServer


async def verify_peer(server: ConfigServer, request: web.Request) -> str | None:
    """The machine name of the caller's certificate, or None.

    The TLS layer already checked the chain to our CA; here a certificate also
    has to be one we issued, unrevoked, for a machine that exists and is enabled.
    """
    ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
    cert = ssl_obj.getpeercert() if ssl_obj is not None else None
    if not cert:
        return None
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
    serial = str(cert.get("serialNumber", "")).lower().lstrip("0")
    if not cn or not serial:
        return None
    async with server.sessionmaker() as s:
        issued = await s.get(db.Certificate, serial)
        if issued is None or issued.revoked_at is not None or issued.subject != cn \
                or issued.kind != "agent":
            return None
        machine = await s.get(db.Machine, cn)
        if machine is None or not machine.enabled:
            return None
    return str(cn)
