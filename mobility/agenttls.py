"""The agent's TLS towards the process server: mutual TLS, the CA's CRL of revoked
servers, and the refusal a revoked server's handshake turns into."""

from __future__ import annotations

import ssl

from mobility.config import MobilityConfig
from wire.protocol import ProtocolError

# OpenSSL's X509_V_ERR_CERT_REVOKED: the server's certificate is on our CRL.
CERT_REVOKED = 23


def client_ssl_context(cfg: MobilityConfig, revocation_list: str | None = None
                       ) -> ssl.SSLContext:
    """Mutual TLS towards the process server; with ``revocation_list`` (the path of a CRL
    from the CA, PEM) a server certificate on it fails the handshake (``CERT_REVOKED``)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.tls_ca)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if revocation_list:
        ctx.load_verify_locations(cafile=revocation_list)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def revoked_refusal(e: BaseException, server: str) -> ProtocolError | None:
    """``server_certificate_revoked`` if ``e`` is a handshake that failed because the
    server's certificate is on the CRL, else None."""
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_code == CERT_REVOKED:
        return ProtocolError(
            "server_certificate_revoked",
            f"the process server {server} presented a certificate the configuration server "
            "revoked: refusing it (it needs a new one: siterecovery cert procserver --name "
            "NAME --host HOST --out DIR --force on the configuration server, then restart "
            "the process server)")
    return None
