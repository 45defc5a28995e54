"""Routes: certificates — issue (admin), enroll with the passphrase and renew (agents, site
listener), list and revoke (admin), and the trust list process servers poll (internal)."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from sqlalchemy import select

from configserver import certs, db, enrollment, hostroles, sitecert
from configserver.ca import Issued
from configserver.peer import peer_certificate
from configserver.rest import NAME, ApiError, Call, Route, array, iso, nullable, obj, reply

log = structlog.get_logger("configserver.certs")

SERIAL = certs.SERIAL
DAYS = {"type": "number", "exclusiveMinimum": 0, "maximum": 3650}
HOST = {"type": "string", "minLength": 1, "maxLength": 253,
        "pattern": "^[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?$"}
ISSUED = obj({"machine": {"type": "string"}, "cert": {"type": "string"},
              "key": {"type": "string"}, "ca": {"type": "string"},
              "serial": {"type": "string"}, "not_after": {"type": "string"}},
             ["machine", "cert", "key", "ca", "serial", "not_after"])
ISSUED_SERVER = obj({"name": {"type": "string"}, "hosts": array({"type": "string"}),
                     "cert": {"type": "string"}, "key": {"type": "string"},
                     "ca": {"type": "string"}, "serial": {"type": "string"},
                     "not_after": {"type": "string"}},
                    ["name", "hosts", "cert", "key", "ca", "serial", "not_after"])
CERT = obj({"serial": {"type": "string"}, "subject": {"type": "string"},
            "kind": {"enum": list(certs.KINDS)}, "state": {"enum": list(certs.STATES)},
            "issued_at": {"type": "string"}, "not_after": {"type": "string"},
            "revoked_at": nullable({"type": "string"})},
           ["serial", "subject", "kind", "state", "issued_at", "not_after", "revoked_at"])
TRUST = obj({"version": {"type": "string"}, "generated_at": {"type": "string"},
             "ca_sha256": {"type": "string"},
             "machines": array(obj({"name": {"type": "string"}, "enabled": {"type": "boolean"},
                                    "serials": array({"type": "string"}),
                                    "disks": array({"type": "string"})},
                                   ["name", "enabled", "serials", "disks"])),
             "revoked": array({"type": "string"})},
            ["version", "generated_at", "ca_sha256", "machines", "revoked"])
MAX_WAIT = 60


def _issued(call: Call, issued: Issued) -> dict[str, Any]:
    return {"machine": issued.subject, "cert": issued.cert_pem.decode(),
            "key": issued.key_pem.decode(), "ca": call.services.ca.cert_pem.decode(),
            "serial": issued.serial, "not_after": iso(issued.not_after)}


# -- admin -------------------------------------------------------------------------------

async def issue_agent_cert(call: Call) -> web.Response:
    svc = call.services
    issued = await certs.issue_agent(svc, svc.ca, call.body["machine"],
                                     call.body.get("days") or svc.cfg.agent_cert_days)
    return reply(_issued(call, issued), status=201)


async def issue_procserver_cert(call: Call) -> web.Response:
    name, hosts = call.body["name"], list(dict.fromkeys(call.body["hosts"]))
    issued = await certs.issue_procserver(call.services, call.services.ca, name, hosts,
                                          call.body.get("days"))
    return reply({"name": name, "hosts": hosts, "cert": issued.cert_pem.decode(),
                  "key": issued.key_pem.decode(), "ca": call.services.ca.cert_pem.decode(),
                  "serial": issued.serial, "not_after": iso(issued.not_after)}, status=201)


async def list_certs(call: Call) -> web.Response:
    q = select(db.Certificate).order_by(db.Certificate.issued_at, db.Certificate.serial)
    if "kind" in call.query:
        q = q.where(db.Certificate.kind == call.query["kind"])
    if "subject" in call.query:
        q = q.where(db.Certificate.subject == call.query["subject"])
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(q)).scalars().all()
    now = call.services.clock()
    docs = [certs.doc(r, now) for r in rows]
    if "state" in call.query:
        docs = [d for d in docs if d["state"] == call.query["state"]]
    return reply({"certificates": docs})


async def _get(call: Call, serial: str) -> db.Certificate:
    async with call.services.sessionmaker() as s:
        row = await s.get(db.Certificate, serial)
    if row is None:
        raise ApiError(404, "certificate_not_found", f"no certificate with serial {serial!r}",
                       "list them: siterecovery cert list")
    return row


async def show_cert(call: Call) -> web.Response:
    row = await _get(call, call.params["serial"])
    return reply(certs.doc(row, call.services.clock()))


async def revoke_cert(call: Call) -> web.Response:
    serial = call.params["serial"]
    now = call.services.clock()
    async with call.services.sessionmaker() as s:
        row = await s.get(db.Certificate, serial)
        if row is None:
            raise ApiError(404, "certificate_not_found",
                           f"no certificate with serial {serial!r}",
                           "list them: siterecovery cert list")
        if row.revoked_at is None or row.revoked_at > now:  # revoking twice changes nothing
            row.revoked_at = now
            await s.commit()
            log.warning("certificate_revoked", serial=serial, subject=row.subject,
                        kind=row.kind)
    if row.kind == "configserver":  # if it is the site listener's, it gets a new one now
        svc = call.services
        await sitecert.reissue_if_revoked(svc, svc.ca, sitecert.tls_dir(svc.cfg.data_dir))
    await call.services.notify()
    return reply(certs.doc(row, now))


# -- site listener: agents ----------------------------------------------------------------

async def enroll(call: Call) -> web.Response:
    svc = call.services
    issued = await enrollment.enroll(
        svc, svc.ca, svc.throttle, svc.passphrase, machine=call.body["machine"],
        given=call.body["passphrase"], addr=call.request.remote or "unknown",
        days=svc.cfg.agent_cert_days, passphrase_file=svc.cfg.passphrase_path.name)
    return reply(_issued(call, issued), status=201)


async def renew(call: Call) -> web.Response:
    """A new certificate for the caller's machine; the one it called with is superseded:
    it keeps working for an hour (in case the new one is lost on the way), then is refused."""
    assert call.peer is not None
    peer = peer_certificate(call.request)
    assert peer is not None  # the agent auth verified it
    svc = call.services
    async with svc.sessionmaker() as s:
        await hostroles.refuse_recovered(s, call.peer, call.query.get("host_id"),
                                         "renewing its certificate")
    issued = await certs.issue_agent(svc, svc.ca, call.peer, svc.cfg.agent_cert_days)
    async with call.services.sessionmaker() as s:
        old = await s.get_one(db.Certificate, peer[1])
        grace_end = call.services.clock() + certs.RENEW_GRACE_SECONDS
        if old.revoked_at is None or old.revoked_at > grace_end:
            old.revoked_at = grace_end
            await s.commit()
    await call.services.notify()
    log.info("agent_certificate_renewed", machine=call.peer, old_serial=peer[1],
             serial=issued.serial)
    return reply(_issued(call, issued), status=201)


# -- internal: process servers ------------------------------------------------------------

def _going_away(request: web.Request) -> bool:
    """The client hung up, or the server is shutting down (aiohttp marks every connection
    closing first, then waits for handlers): a long poll should answer now."""
    transport = request.transport
    return transport is None or transport.is_closing() or \
        bool(getattr(request.protocol, "_close", False))


async def trust(call: Call) -> web.Response:
    """The trust list; with ``version`` and ``wait``, a long poll: answer as soon as the
    list differs from ``version``, or after ``wait`` seconds with the same list."""
    svc = call.services
    doc = await certs.trust_list(svc, svc.ca.fingerprint)
    known, wait = call.query.get("version"), float(call.query.get("wait", 0))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while known == doc["version"] and (left := deadline - loop.time()) > 0 \
            and not _going_away(call.request):
        # Our own changes notify; others' (a machine disabled) are seen within a second.
        await svc.notifier.wait(min(1.0, left))
        doc = await certs.trust_list(svc, svc.ca.fingerprint)
    return reply(doc)


ROUTES = [
    Route("POST", "/api/v1/certificates/agent", issue_agent_cert,
          "Issue a client certificate for a machine (admin)", "certificates",
          description="The admin path of enrollment (agents enroll with the passphrase on the "
                      "site listener). The certificate is recorded; it authorizes the machine "
                      "only while the machine is in the inventory and enabled.",
          body=obj({"machine": NAME, "days": DAYS}, ["machine"]), responses={201: ISSUED}),
    Route("POST", "/api/v1/certificates/procserver", issue_procserver_cert,
          "Issue a server certificate for a process server", "certificates",
          body=obj({"name": NAME, "hosts": {**array(HOST), "minItems": 1, "maxItems": 32},
                    "days": DAYS}, ["name", "hosts"]),
          responses={201: ISSUED_SERVER}),
    Route("GET", "/api/v1/certificates", list_certs, "List every certificate the CA issued",
          "certificates",
          query={"kind": {"enum": list(certs.KINDS)}, "subject": NAME,
                 "state": {"enum": list(certs.STATES)}},
          responses={200: obj({"certificates": array(CERT)}, ["certificates"])}),
    Route("GET", "/api/v1/certificates/{serial}", show_cert, "Show one certificate",
          "certificates", params={"serial": SERIAL}, responses={200: CERT}),
    Route("POST", "/api/v1/certificates/{serial}/revoke", revoke_cert,
          "Revoke a certificate", "certificates", params={"serial": SERIAL},
          description="From now on the configuration server and every process server refuse "
                      "it; agents refuse a revoked process-server or site-listener "
                      "certificate (their settings list them), a process server whose own "
                      "certificate is revoked refuses every session, and the site listener "
                      "gets a new certificate at once. Revoking a revoked certificate "
                      "changes nothing. No request body.",
          responses={200: CERT}),
    Route("POST", "/api/v1/agent/enroll", enroll,
          "Enroll a machine with the passphrase: its client certificate", "agent", auth="none",
          description="For a machine the operator added to the inventory and that is enabled. "
                      "Repeated wrong passphrases from one address are refused for a while "
                      "(429).",
          body=obj({"machine": NAME, "passphrase": {"type": "string", "minLength": 1,
                                                     "maxLength": 1024}},
                   ["machine", "passphrase"]),
          responses={201: ISSUED}, listeners=("site",)),
    Route("POST", "/api/v1/agent/renew", renew,
          "Renew the calling machine's certificate", "agent", auth="agent",
          description="The certificate the call was made with stays valid for one more hour, "
                      "then is refused. No request body. 409 recovered_machine from the "
                      "recovered copy of the machine (while it is failed over, any "
                      "host_id but the machine's own): it shares the certificate.",
          query={"host_id": hostroles.HOST_ID},
          responses={201: ISSUED}, listeners=("site",)),
    Route("GET", "/api/v1/internal/trust", trust,
          "The certificates process servers must refuse (process servers)", "certificates",
          auth="internal",
          query={"version": {"type": "string", "maxLength": 64},
                 "wait": {"type": "integer", "minimum": 0, "maximum": MAX_WAIT}},
          responses={200: TRUST}, listeners=("admin", "site")),
]
