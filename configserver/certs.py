"""Certificates: every one the CA issues is recorded; revocation; the trust list.

The ``certificates`` table holds one row per certificate (serial = lowercase hex
without leading zeros, subject = common name, kind ``agent`` | ``procserver`` |
``configserver``). A certificate's state is computed from its row and the clock:

- ``revoked``    ``revoked_at`` is set and has passed;
- ``superseded`` renewed: ``revoked_at`` is set in the future (the old certificate
  keeps working for ``RENEW_GRACE_SECONDS``, so an agent that died before it saved
  the new one can renew again);
- ``expired``    ``not_after`` has passed;
- ``valid``      otherwise.

An agent certificate is *trusted* when it is valid (or superseded), its machine is
in the inventory and enabled, and it was issued after the machine row was created
(a machine removed and added again does not inherit its old certificates). The
configuration server's site listener (``peer.py``) and, through the trust list,
every process server (``procserver/trust.py``) apply this one rule.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.ca import CertificateAuthority, Issued, serial_hex
from configserver.core import Core
from configserver.schema import iso

log = structlog.get_logger("configserver.certs")

KINDS = ("agent", "procserver", "configserver")
SERVER_KINDS = ("procserver", "configserver")
SERIAL = {"type": "string", "pattern": "^[0-9a-f]{1,40}$"}
STATES = ("valid", "superseded", "revoked", "expired")
RENEW_GRACE_SECONDS = 3600.0
PROCSERVER_DAYS = 365.0


def state(row: db.Certificate, now: float) -> str:
    if row.revoked_at is not None and row.revoked_at <= now:
        return "revoked"
    if row.not_after <= now:
        return "expired"
    if row.revoked_at is not None:
        return "superseded"
    return "valid"


def doc(row: db.Certificate, now: float) -> dict[str, Any]:
    return {"serial": row.serial, "subject": row.subject, "kind": row.kind,
            "state": state(row, now), "issued_at": iso(row.issued_at),
            "not_after": iso(row.not_after), "revoked_at": iso(row.revoked_at)}


def trusted(row: db.Certificate | None, machine: db.Machine | None, now: float) -> str | None:
    """Why an agent certificate is refused (None: trusted). ``row`` is its catalog row,
    ``machine`` the inventory row of its subject."""
    if row is None or row.kind != "agent":
        return "certificate_unknown"
    st = state(row, now)
    if st in ("revoked", "expired"):
        return f"certificate_{st}"
    if machine is None:
        return "machine_unknown"
    if not machine.enabled:
        return "machine_disabled"
    if row.issued_at < machine.created:
        return "certificate_unknown"  # issued to an earlier machine of that name
    return None


async def record(core: Core, issued: Issued, kind: str, *,
                 issued_at: float | None = None) -> None:
    """Add a certificate the CA issued to the catalog (idempotent on the serial)."""
    assert kind in KINDS, kind
    async with core.sessionmaker() as s:
        if await s.get(db.Certificate, issued.serial) is None:
            s.add(db.Certificate(serial=issued.serial, subject=issued.subject, kind=kind,
                                 issued_at=core.clock() if issued_at is None else issued_at,
                                 not_after=issued.not_after))
            await s.commit()
            core.metrics.certs_issued.labels(kind).inc()
    await core.notify()


async def record_pem(core: Core, pem: bytes, kind: str) -> Issued:
    """Record a certificate issued earlier (a PEM file on disk), if it is not yet listed."""
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    issued = Issued(pem, b"", serial_hex(cert.serial_number),
                    str(cn[0].value) if cn else "", cert.not_valid_before_utc.timestamp(),
                    cert.not_valid_after_utc.timestamp())
    await record(core, issued, kind, issued_at=issued.not_before)
    return issued


async def issue_agent(core: Core, ca: CertificateAuthority, machine: str,
                      days: float) -> Issued:
    """Issue and record a client certificate for ``machine``, valid for ``days``."""
    issued = ca.issue_client(machine, days, now=core.clock())
    await record(core, issued, "agent")
    log.info("agent_certificate_issued", machine=machine, serial=issued.serial,
             not_after=iso(issued.not_after))
    return issued


async def issue_procserver(core: Core, ca: CertificateAuthority, name: str, hosts: list[str],
                           days: float | None = None) -> Issued:
    """Issue and record a server certificate for a process server reachable as ``hosts``."""
    issued = ca.issue_server(name, hosts, days or PROCSERVER_DAYS, now=core.clock())
    await record(core, issued, "procserver")
    log.info("procserver_certificate_issued", procserver=name, serial=issued.serial,
             hosts=hosts, not_after=iso(issued.not_after))
    return issued


async def record_own(core: Core, pem: Path) -> None:
    """Record the site listener's certificate ``pem`` (issued at start, before the catalog
    is written to): with this, every certificate the CA issued is in the catalog."""
    if pem.exists():
        await record_pem(core, pem.read_bytes(), "configserver")


async def revoked_servers(s: AsyncSession, now: float) -> list[tuple[str, float]]:
    """Revoked server certificates (process servers, the site listener) that have not
    expired, as (serial, revoked at): what agents must refuse (their settings carry
    them, and a CRL of them)."""
    rows = (await s.execute(select(db.Certificate.serial, db.Certificate.revoked_at).where(
        db.Certificate.kind.in_(SERVER_KINDS), db.Certificate.revoked_at.is_not(None),
        db.Certificate.revoked_at <= now, db.Certificate.not_after > now)
        .order_by(db.Certificate.serial))).all()
    return [(str(serial), float(at or now)) for serial, at in rows]


# -- the trust list ---------------------------------------------------------------------

async def trust_list(core: Core, ca_sha256: str) -> dict[str, Any]:
    """What process servers need to refuse certificates the CA alone would accept.

    ``machines``: every machine of the inventory with ``enabled``, the serials of its
    trusted agent certificates and the names of its disks (the only ones it may write;
    none listed: the inventory does not say); ``revoked``: revoked serials not yet
    expired, of agents and of servers (a process server finds its own among them and
    stops accepting). ``version`` changes exactly when the content does. ``ca_sha256`` is the CA
    certificate's fingerprint.
    """
    now = core.clock()
    async with core.sessionmaker() as s:
        machines = (await s.execute(select(db.Machine).order_by(db.Machine.name))
                    ).scalars().all()
        rows = (await s.execute(select(db.Certificate).where(
            db.Certificate.kind == "agent", db.Certificate.not_after > now)
            .order_by(db.Certificate.serial))).scalars().all()
        servers = await revoked_servers(s, now)
    by_subject: dict[str, list[db.Certificate]] = {}
    for r in rows:
        by_subject.setdefault(r.subject, []).append(r)
    content = {
        "ca_sha256": ca_sha256,
        "machines": [{"name": m.name, "enabled": bool(m.enabled),
                      "serials": [r.serial for r in by_subject.get(m.name, [])
                                  if trusted(r, m, now) is None],
                      "disks": sorted(str(d["name"]) for d in m.disks or [])}
                     for m in machines],
        "revoked": sorted([r.serial for r in rows if state(r, now) == "revoked"]
                          + [serial for serial, _ in servers]),
    }
    version = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": version, "generated_at": iso(now), **content}
