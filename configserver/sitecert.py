"""The site listener's own certificate: replaced when it is revoked, served fresh.

``ConfigServer._site_tls`` issues ``data_dir/tls/site.pem`` (and ``site.key``) for the
names in ``tls/names``. A revoked site certificate must not go on being served: agents
refuse it (their settings list revoked server certificates). So

- ``reissue_if_revoked`` gives the listener a new certificate, for the same names, when
  the catalog says the one in ``site.pem`` is revoked: at start, and at once when it
  is revoked through the API (``site_certificate_reissued``);
- ``watch`` makes a listening context pick up a replaced ``site.pem`` at the next TLS
  handshake (``common.certwatch``), so the listener never has to restart for it.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import structlog
from cryptography import x509

from common import certwatch
from common.tls import server_context
from configserver import certs, db
from configserver.ca import CertificateAuthority, serial_hex, write_bundle
from configserver.core import Core

log = structlog.get_logger("configserver.sitecert")


def tls_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "tls"


def _serial(pem: Path) -> str | None:
    try:
        return serial_hex(x509.load_pem_x509_certificate(pem.read_bytes()).serial_number)
    except (OSError, ValueError):
        return None


async def reissue_if_revoked(core: Core, ca: CertificateAuthority, directory: Path) -> bool:
    """Give the site listener a new certificate if the catalog says the one in
    ``directory/site.pem`` is revoked; return whether it did. The new one is recorded."""
    pem = directory / "site.pem"
    serial = _serial(pem)
    if serial is None:
        return False
    async with core.sessionmaker() as s:
        row = await s.get(db.Certificate, serial)
    if row is None or certs.state(row, core.clock()) != "revoked":
        return False
    names = [n for n in (directory / "names").read_text().split(",") if n] \
        if (directory / "names").exists() else ["127.0.0.1", "localhost"]
    issued = ca.issue_server("configserver", names, now=core.clock())
    write_bundle(directory, "site", issued, ca.cert_pem)
    await certs.record(core, issued, "configserver")
    log.warning("site_certificate_reissued", revoked=serial, serial=issued.serial,
                names=names, hint="the site listener's certificate was revoked: it serves "
                                  "the new one from the next connection on")
    return True


def watch(ctx: ssl.SSLContext, directory: Path, cafile: str) -> None:
    """Serve the current ``directory/site.pem`` through ``ctx``: when the file is replaced,
    each new connection is switched to a context loaded from the new files (the same
    settings: ``common.tls.server_context``, client certificates optional)."""
    pem, key = directory / "site.pem", directory / "site.key"
    certwatch.watch(ctx, str(pem), lambda: server_context(
        cafile=cafile, certfile=str(pem), keyfile=str(key), verify_mode=ssl.CERT_OPTIONAL))
