"""The configuration server's certificate authority (ECDSA P-256, cryptography x509).

Process servers get server certificates; each protected machine gets a client
certificate whose common name is the machine's name, which process servers use
to authorize the machine's writes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 365


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def serial_hex(n: int) -> str:
    """A serial number as the catalog and the API spell it: lowercase hex, no leading zeros."""
    return format(n, "x")


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    serial: str = ""  # serial_hex of the certificate's serial number
    subject: str = ""  # the common name
    not_before: float = 0.0  # UNIX seconds
    not_after: float = 0.0

    def __repr__(self) -> str:
        return f"Issued(serial={self.serial!r}, subject={self.subject!r}, key=<secret>)"


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 directory: Path) -> None:
        self.cert, self.key, self.directory = cert, key, directory

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_path, key_path = d / "ca.pem", d / "ca.key"
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC private key")
            return cls(cert, key, d)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "siterecovery CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key, d)

    def _issue(self, cn: str, *, server_names: list[str] | None, days: float,
               now: float | None, public_key: ec.EllipticCurvePublicKey | None = None
               ) -> Issued:
        # With public_key (from a CSR) the private key stays where it was made.
        key: ec.EllipticCurvePrivateKey | None = None
        if public_key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public_key = key.public_key()
        t = dt.datetime.now(dt.UTC) if now is None else dt.datetime.fromtimestamp(now, dt.UTC)
        serial = x509.random_serial_number()
        not_before = t - dt.timedelta(minutes=5)
        not_after = t + dt.timedelta(days=days)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if server_names is not None:
            sans: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    sans.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM),
                      _key_pem(key) if key is not None else b"", serial_hex(serial), cn,
                      not_before.timestamp(), not_after.timestamp())

    def issue_server(self, name: str, hosts: list[str], days: float = LEAF_DAYS, *,
                     now: float | None = None) -> Issued:
        """A server certificate (TLS server auth) for ``hosts`` (IP addresses or DNS names).

        Not recorded anywhere: ``configserver/certs.py`` issues and records."""
        return self._issue(name, server_names=hosts, days=days, now=now)

    def issue_client(self, machine: str, days: float = LEAF_DAYS, *,
                     now: float | None = None) -> Issued:
        """A client certificate (TLS client auth) whose common name is ``machine``."""
        return self._issue(machine, server_names=None, days=days, now=now)

    def sign_client_csr(self, machine: str, csr_pem: bytes, days: float = LEAF_DAYS, *,
                        now: float | None = None) -> Issued:
        """A client certificate for the key of ``csr_pem`` (made on the machine, never sent):
        the request must be signed by that key, name ``machine`` as its common name and hold
        a P-256 key; else ``ValueError`` says which. ``key_pem`` of the result is empty."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise ValueError("the certificate request is not a PEM CSR") from None
        if not csr.is_signature_valid:
            raise ValueError("the certificate request's signature does not verify")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [n.value for n in names] != [machine]:
            raise ValueError(f"the certificate request names {[n.value for n in names]}, "
                             f"not the machine {machine!r}")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or \
                not isinstance(public.curve, ec.SECP256R1):
            raise ValueError("the certificate request's key must be EC P-256")
        return self._issue(machine, server_names=None, days=days, now=now, public_key=public)

    def revocation_list(self, revoked: list[tuple[str, float]], now: float) -> bytes:
        """A CRL (PEM) signed by the CA listing ``revoked`` (serial_hex, revoked-at UNIX
        seconds). Its number is ``now`` in milliseconds, so a newer list has a higher
        number; it is valid until the CA expires (the list, not its age, is what matters:
        an agent that cannot reach the configuration server keeps its last one)."""
        t = dt.datetime.fromtimestamp(now, dt.UTC)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.cert.subject)
                   .last_update(t - dt.timedelta(minutes=5))
                   .next_update(self.cert.not_valid_after_utc)
                   .add_extension(x509.CRLNumber(int(now * 1000)), critical=False))
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                .revocation_date(dt.datetime.fromtimestamp(when, dt.UTC)).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (DER), lowercase hex: how process servers tell
        that a trust list speaks for the CA they verify agents with."""
        return self.cert.fingerprint(hashes.SHA256()).hex()


def write_bundle(directory: str | os.PathLike[str], stem: str, issued: Issued,
                 ca_pem: bytes) -> tuple[Path, Path, Path]:
    """Write ``<stem>.pem``, ``<stem>.key`` (0600) and ``ca.pem`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert, key, ca = d / f"{stem}.pem", d / f"{stem}.key", d / "ca.pem"
    cert.write_bytes(issued.cert_pem)
    _write_private(key, issued.key_pem)
    ca.write_bytes(ca_pem)
    return cert, key, ca
