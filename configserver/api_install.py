"""Routes: push install of the Mobility agent — install, upgrade, uninstall a machine's
agent (admin: each queues its job), the machine's recorded host key, and the request
channel process servers poll, claim, report and have certificates signed through
(internal). The domain is configserver/install.py, the jobs configserver/installjob.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from aiohttp import web

from configserver import install
from configserver.jobs import JOB, job_doc
from configserver.rest import NAME, Call, Route, array, nullable, obj, reply

MAX_WAIT = 20
_PUSH_BODY = obj({
    "known_hosts": {"type": "string", "maxLength": 1 << 20,
                    "description": "an OpenSSH known_hosts text holding the machine's host key "
                                   "(by name or address): recorded as the operator's and "
                                   "pinned from now on"},
    "forget_host_key": {"type": "boolean",
                        "description": "forget the recorded host key first: the next one "
                                       "seen is trusted (a machine really reinstalled)"},
    "server": {"type": "string", "pattern": "^[!-~]{1,255}$",
               "description": "host:port the agent replicates to (default: the process "
                              "server's address from its heartbeat)"},
    "site_url": {"type": "string", "pattern": "^https://[!-~]{1,255}$",
                 "description": "the configuration server's site listener as the machine "
                                "reaches it (default: from site_names/site_host)"},
    "heartbeat_timeout_seconds": {"type": "integer", "minimum": 1, "maximum": 86400,
                                  "description": "how long to wait for the agent's first "
                                                 "heartbeat (default 600)"},
})
HOST_KEY = obj({"machine": {"type": "string"}, "host_key": nullable({"type": "string"}),
                "fingerprint": nullable({"type": "string"}),
                "source": nullable({"enum": ["tofu", "operator"]}),
                "recorded": nullable({"type": "number"})},
               ["machine", "host_key", "fingerprint", "source", "recorded"])
REQUEST = obj({"id": {"type": "string"}, "machine": {"type": "string"},
               "action": {"enum": list(install.ACTIONS)}, "state": {"type": "string"},
               "steps": array({"type": "string"}), "params": {"type": "object"}},
              ["id", "machine", "action", "state", "steps", "params"])
CLAIMED = {**REQUEST, "properties": {**REQUEST["properties"], "account": obj(
    {"username": {"type": "string"}, "kind": {"type": "string"},
     "secret": {"type": "string", "writeOnly": True}}, ["username", "kind", "secret"])},
           "required": [*REQUEST["required"], "account"]}
WHO = obj({"procserver": NAME}, ["procserver"])
REPORT = obj({
    "procserver": NAME,
    "step": {"type": "string", "pattern": "^[a-z_]{1,32}$"},
    "state": {"enum": ["succeeded", "failed"]},
    "message": {"type": "string", "maxLength": 20000},
    "host_key": {"type": "string", "maxLength": 16384,
                 "description": "prerequisites: the key the machine presented"},
    "facts": obj({"os_name": {"type": "string", "maxLength": 64},
                  "os_version": {"type": "string", "maxLength": 32},
                  "kernel": {"type": "string", "maxLength": 64}}),
    "version": {"type": "string", "maxLength": 64,
                "description": "install: the agent version installed now"},
    "how": {"type": "string", "maxLength": 2000,
            "description": "start: how the agent runs (or how to start it)"},
    "running_before": {"type": "boolean",
                       "description": "start: it was running already and nothing changed"},
}, ["procserver", "step", "state"])
ANSWER = obj({"state": {"type": "string"}, "error": nullable({"type": "string"})},
             ["state", "error"])
CSR = obj({"procserver": NAME, "csr": {"type": "string", "maxLength": 16384}},
          ["procserver", "csr"])
SIGNED = obj({"cert": {"type": "string"}, "ca": {"type": "string"},
              "serial": {"type": "string"}}, ["cert", "ca", "serial"])
_JOB_ID = {"id": {"type": "string", "pattern": "^[0-9a-f-]{36}$"}}


def _push(action: str) -> Any:
    async def handler(call: Call) -> web.Response:
        svc = call.services
        job = await install.queue(svc, svc.jobs.kinds, action, call.params["name"],
                                  call.body or {}, install.site_url(svc.cfg))
        await svc.notify()
        return reply({"job": job_doc(job, svc.jobs.kinds)}, status=202)

    return handler


async def host_key(call: Call) -> web.Response:
    return reply(await install.host_key_doc(call.services, call.params["name"]))


def _version(requests: list[dict[str, Any]]) -> str:
    return hashlib.blake2b(json.dumps(requests, sort_keys=True).encode(),
                           digest_size=8).hexdigest()


async def poll(call: Call) -> web.Response:
    """With ``version`` and ``wait``, a long poll: answer as soon as the list differs from
    ``version``, or after ``wait`` seconds with the same list."""
    svc, name = call.services, call.params["name"]
    known = call.query.get("version")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + float(call.query.get("wait", 0))
    found = await install.pending(svc, name)
    while known == _version(found) and (left := deadline - loop.time()) > 0 \
            and not _going_away(call.request):
        await svc.notifier.wait(min(1.0, left))
        found = await install.pending(svc, name)
    return reply({"requests": found, "version": _version(found)})


def _going_away(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing() or \
        bool(getattr(request.protocol, "_close", False))


async def claim(call: Call) -> web.Response:
    svc = call.services
    return reply(await install.claim(svc, call.params["id"], call.body["procserver"],
                                     svc.cfg.secrets_key_path))


async def report(call: Call) -> web.Response:
    return reply(await install.report(call.services, call.params["id"],
                                      call.body["procserver"], call.body))


async def sign(call: Call) -> web.Response:
    svc = call.services
    return reply(await install.sign(svc, svc.ca, call.params["id"], call.body["procserver"],
                                    call.body["csr"], svc.cfg.agent_cert_days), status=201)


_NAME = {"name": NAME}
_INTERNAL: dict[str, Any] = {"auth": "internal", "listeners": ("admin", "site")}
ROUTES = [
    *(Route("POST", f"/api/v1/machines/{{name}}/{action}", _push(action),
            f"{action.capitalize()} a machine's Mobility agent (push install)", "machines",
            params=_NAME, body=_PUSH_BODY, responses={202: obj({"job": JOB}, ["job"])},
            description=f"Queues the job agent_{action}: its process server logs in over SSH "
                        "with the machine's account, checks the prerequisites one by one "
                        "(a changed host key refuses with both fingerprints), then "
                        + ("removes the agent and everything its install listed."
                           if action == "uninstall" else
                           "copies and installs the agent bundle, enrolls the agent (its key "
                           "made on the machine), starts it and waits for its first "
                           "heartbeat. Run again on an installed machine, it verifies and "
                           "changes nothing" + ("; an upgrade keeps the agent's state (its "
                                                "next cycle is a delta)."
                                                if action == "upgrade" else ".")),
            refusals=("the machine runs Windows (unsupported_os)",
                      "known_hosts gives no key, or several, for the machine "
                      "(bad_known_hosts)"))
      for action in install.ACTIONS),
    Route("GET", "/api/v1/machines/{name}/host-key", host_key,
          "A machine's recorded SSH host key", "machines", params=_NAME,
          responses={200: HOST_KEY}),
    Route("GET", "/api/v1/internal/procservers/{name}/install-requests", poll,
          "The install requests a process server is to run (process servers)", "machines",
          params=_NAME, query={"version": {"type": "string", "maxLength": 64},
                               "wait": {"type": "integer", "minimum": 0, "maximum": MAX_WAIT}},
          responses={200: obj({"requests": array(REQUEST), "version": {"type": "string"}},
                              ["requests", "version"])}, **_INTERNAL,
          description="Pending requests, and those it claimed (a restarted process server "
                      "runs them again). With the version of the last answer and wait, a "
                      "long poll: answered as soon as the list changes."),
    Route("POST", "/api/v1/internal/install-requests/{id}/claim", claim,
          "Claim an install request (process servers)", "machines", params=_JOB_ID,
          body=WHO, responses={200: CLAIMED}, **_INTERNAL,
          description="The answer carries the machine's account with its secret, opened for "
                      "this answer only. 409 when the request ended."),
    Route("POST", "/api/v1/internal/install-requests/{id}/report", report,
          "Report an install step (process servers)", "machines", params=_JOB_ID,
          body=REPORT, responses={200: ANSWER}, **_INTERNAL,
          description="The answer's state says whether to go on (claimed, or done after the "
                      "last step). The prerequisites report records a first host key and "
                      "has the OS judged against the support matrix."),
    Route("POST", "/api/v1/internal/install-requests/{id}/csr", sign,
          "Sign the certificate request an agent made on its machine (process servers)",
          "machines", params=_JOB_ID, body=CSR, responses={201: SIGNED}, **_INTERNAL),
]
