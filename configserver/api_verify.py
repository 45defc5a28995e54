"""Routes: verification of recovery points (start a run, the stored results); the job is
``configserver/verifyjob.py``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from configserver import verifyjob
from configserver.jobs import JOB, job_doc
from configserver.rest import NAME, Call, Route, array, obj, reply
from configserver.schema import nullable

_DAMAGE = obj({"object": {"type": "string"}, "reason": {"type": "string"}},
              ["object", "reason"])
_POINT = obj({"point": {"type": "string"}, "machine": {"type": "string"},
              "verified": {"type": "number"}, "ok": {"type": "boolean"},
              "damaged": array(_DAMAGE)}, ["point", "machine", "verified", "ok", "damaged"])
STATUS = obj({
    "points": array(_POINT), "verified": {"type": "integer"}, "failed": {"type": "integer"},
    "last_job": nullable(obj({"id": {"type": "string"}, "state": {"type": "string"},
                              "created": {"type": "number"}, "ended": nullable(
                                  {"type": "number"}), "error": nullable({"type": "string"})},
                             ["id", "state", "created", "ended", "error"])),
}, ["points", "verified", "failed", "last_job"])
RUN_BODY = obj({
    "machine": NAME,
    "all": {"type": "boolean", "description": (
        "every retained point, not only the new ones and a daily share of those due for "
        "re-verification (verify_reverify_days, verify_daily_share_percent)")},
})


async def run_verify(call: Call) -> web.Response:
    cfg = call.services.cfg
    body: dict[str, Any] = call.body or {}
    params: dict[str, Any] = {"all": bool(body.get("all", False)),
                              "reverify_days": cfg.verify_reverify_days,
                              "daily_share": cfg.verify_daily_share_percent,
                              **verifyjob.budget(cfg.gc_memory_mib, cfg.data_dir)}
    if body.get("machine"):
        params["machine"] = body["machine"]
    job = await verifyjob.request(call.services, params)
    return reply({"job": job_doc(job, call.services.jobs.kinds)}, status=202)


async def verify_status(call: Call) -> web.Response:
    return reply(await verifyjob.status(call.services, call.query.get("machine")))


ROUTES = [
    Route("POST", "/api/v1/verify", run_verify, "Verify recovery points", "verify",
          body=RUN_BODY, responses={202: obj({"job": JOB}, ["job"])},
          description="Queues Verify recovery points (target 'vault'): each point chosen is "
                      "shown to restore to its recorded digests, reading its blocks under the "
                      "vault's shared lock (uploads go on). The job fails, naming the damaged "
                      "objects, when a point fails; an alert point_verification_failed is "
                      "raised for its machine."),
    Route("GET", "/api/v1/verify", verify_status, "Recovery points' verification results",
          "verify", query={"machine": NAME}, responses={200: STATUS},
          description="Each retained point's last verification, newest first, and the last "
                      "Verify recovery points job."),
]
