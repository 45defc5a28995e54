"""Certificate renewal: a new certificate for the current one, switched to in one rename.

The order is what makes it safe to interrupt: the new key and certificate are
written first (new names, so the old pair stays untouched), then mobility.toml is
pointed at them in one atomic replacement, and only then are the old files deleted.
Killed half way, the agent still has a config that names files that exist; the old
certificate stays valid for an hour after a renewal, so running it again works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common.fs import atomic_write
from mobility import agentfile
from mobility.siteclient import SiteClient


@dataclass(frozen=True)
class Renewed:
    machine: str
    serial: str
    not_after: str  # as the configuration server states it
    cert: Path
    key: Path


def cert_not_after(path: str) -> float:
    """When the PEM certificate at ``path`` expires (seconds since the epoch)."""
    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return cert.not_valid_after_utc.timestamp()


async def renew(site: SiteClient, config: Path, tls_cert: str, tls_key: str) -> Renewed:
    """Renew the certificate ``site`` authenticates with (``tls_cert``/``tls_key``, the
    files ``config`` names): write the new pair beside the old one, point ``config`` at
    it, delete the old files and make ``site`` use the new pair.

    Raises ``SiteError`` (``config`` and the old files unchanged) or
    ``agentfile.AgentFileError`` (the new files are written and ``site`` uses them;
    ``config`` still names the old ones, which are kept)."""
    issued = await site.renew()
    old_cert, old_key = Path(tls_cert), Path(tls_key)
    d, stem = old_cert.parent, f"agent-{issued['serial'][:16]}"
    new_cert, new_key = d / f"{stem}.pem", d / f"{stem}.key"
    atomic_write(new_key, issued["key"])
    atomic_write(new_cert, issued["cert"])
    # Switch before the config names the new pair: it proves the pair loads while the
    # old files are still there to fall back on (the old certificate works for an hour).
    site.use_cert(str(new_cert), str(new_key))
    agentfile.update(config, {"tls_cert": str(new_cert.resolve()),
                              "tls_key": str(new_key.resolve())})
    for old in (old_cert, old_key):
        if old not in (new_cert, new_key):
            old.unlink(missing_ok=True)
    return Renewed(issued["machine"], issued["serial"], issued["not_after"], new_cert, new_key)
