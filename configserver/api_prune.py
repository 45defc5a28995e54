"""Routes: Prune the vault by hand (the job is ``configserver/gcjob.py``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from configserver import gcjob
from configserver.jobs import JOB, job_doc
from configserver.rest import Call, Route, obj, reply

RUN_BODY = obj({"dry_run": {"type": "boolean", "description": (
    "only say which points would be forgotten; nothing is deleted")}})


async def run_prune(call: Call) -> web.Response:
    body: dict[str, Any] = call.body or {}
    job = await gcjob.request(call.services, {"dry_run": bool(body.get("dry_run", False)),
                                              **gcjob.budget(call.services.cfg.gc_memory_mib)})
    return reply({"job": job_doc(job, call.services.jobs.kinds)}, status=202)


ROUTES = [
    Route("POST", "/api/v1/prune", run_prune, "Prune the vault", "verify",
          body=RUN_BODY, responses={202: obj({"job": JOB}, ["job"])},
          description="Queues Prune the vault (target 'vault'): under the vault's exclusive "
                      "lock, points no policy keeps are forgotten (every point younger than "
                      "the longest policy retention_hours stays, and each machine's newest "
                      "and newest app-consistent point), then unreferenced maps and packs "
                      "are deleted and mostly-dead packs repacked, within the server's "
                      "gc_memory_mib (the job's memory_mib). Fails when no policy "
                      "exists or the vault stays locked."),
]
