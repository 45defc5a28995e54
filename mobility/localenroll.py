"""Enrollment done on the machine itself, for the push install: the private key is made
here and never leaves; only a certificate request goes out, and the signed certificate
and the CA come back to be written next to it.

``request`` makes (once) ``DIR/agent.key`` (P-256, 0600) and returns a CSR naming the
machine; a re-run reuses the key, so a push install that died after this step is run
again safely. ``configure`` writes ``DIR/mobility.toml`` once ``DIR/ca.pem`` and
``DIR/agent.pem`` are there, with this agent's own renderer (``agentfile.render``), so
the file always matches the agent that reads it.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.fs import atomic_write, create_exclusive
from mobility import agentfile


class LocalEnrollError(Exception):
    """The local enrollment step cannot be done as asked; ``str(e)`` says why."""


def request(directory: Path, machine: str) -> bytes:
    """The CSR (PEM) for ``machine`` with the key in ``directory`` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / "agent.key"
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        create_exclusive(path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), mode=0o600)
    except FileExistsError:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise LocalEnrollError(f"{path} is not an EC key: remove it to make a new one") \
                from None
        key = loaded
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, machine)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def configure(directory: Path, *, machine: str, server_host: str, server_port: int,
              site_url: str, state_dir: str, disks: list[tuple[str, str]]) -> Path:
    """Write ``directory/mobility.toml`` for the key, certificate and CA there; the
    certificate must be for this key (``LocalEnrollError`` otherwise)."""
    ca, cert, key = directory / "ca.pem", directory / "agent.pem", directory / "agent.key"
    for p in (ca, cert, key):
        if not p.exists():
            raise LocalEnrollError(f"{p} is missing: enrollment is not complete")
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    own = serialization.load_pem_private_key(key.read_bytes(), password=None)
    if issued.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            own.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo):
        raise LocalEnrollError(f"{cert} is not the certificate of {key}")
    out = directory / "mobility.toml"
    atomic_write(out, agentfile.render(
        machine=machine, server_host=server_host, server_port=server_port,
        site_url=site_url, tls_ca=str(ca), tls_cert=str(cert), tls_key=str(key),
        state_dir=state_dir, disks=disks), mode=0o644)
    return out
