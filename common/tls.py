"""The TLS settings of every listener we run (9443 replication, 9441 site).

Only AEAD suites are offered: TLS 1.3 (whose suites are all AEAD) and, for TLS 1.2,
ECDHE key exchange with AES-GCM or ChaCha20-Poly1305. Python's default server list
also holds ``ECDH+AES`` CBC suites (``ECDHE-*-AES*-SHA256/384``): MAC-then-encrypt,
the family of Lucky13 and POODLE-style padding oracles, which scanners flag.
"""

from __future__ import annotations

import ssl

# OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are configured apart and are AEAD).
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def server_context(*, cafile: str, certfile: str, keyfile: str,
                   verify_mode: ssl.VerifyMode) -> ssl.SSLContext:
    """A server context: our certificate chain, client certificates checked against
    ``cafile`` as ``verify_mode`` says, TLS 1.2 or newer, AEAD suites only, the server's
    order of preference, no TLS 1.2 renegotiation. Raises ``OSError``/``ssl.SSLError``
    if a file is missing or unusable."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(certfile, keyfile)
    ctx.verify_mode = verify_mode
    return ctx
