"""Routes: certificates for protected machines."""

from __future__ import annotations

import structlog
from aiohttp import web

from configserver.rest import NAME, Call, Route, obj, reply

log = structlog.get_logger("configserver.certs")

ISSUED = obj({"machine": {"type": "string"}, "cert": {"type": "string"},
              "key": {"type": "string"}, "ca": {"type": "string"}},
             ["machine", "cert", "key", "ca"])


async def issue_agent_cert(call: Call) -> web.Response:
    machine: str = call.body["machine"]
    issued = call.server.ca.issue_client(machine)
    log.info("agent_certificate_issued", machine=machine)
    return reply({"machine": machine, "cert": issued.cert_pem.decode(),
                  "key": issued.key_pem.decode(), "ca": call.server.ca.cert_pem.decode()},
                 status=201)


ROUTES = [
    Route("POST", "/api/v1/certificates/agent", issue_agent_cert,
          "Issue a client certificate for a machine (admin)", "certificates",
          body=obj({"machine": NAME}, ["machine"]), responses={201: ISSUED}),
]
