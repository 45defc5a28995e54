"""Routes: jobs (list, show, cancel)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from sqlalchemy import select

from configserver import db
from configserver.jobkinds import KINDS
from configserver.jobs import ACTIVE, JOB, JOB_ID, JOB_STATES, job_doc, wait_tick
from configserver.rest import NAME, ApiError, Call, Route, array, obj, reply

_ID = {"id": JOB_ID}
# a machine's name, or a plan's or group's jobs ("plan:NAME", "group:NAME")
TARGET = {"type": "string", "pattern": "^(plan:|group:)?" + NAME["pattern"].lstrip("^")}


async def list_jobs(call: Call) -> web.Response:
    q = select(db.Job).order_by(db.Job.id.desc()).limit(call.query.get("limit", 100))
    for key, column in (("target", db.Job.target), ("kind", db.Job.kind),
                        ("state", db.Job.state)):
        if key in call.query:
            q = q.where(column == call.query[key])
    if "active" in call.query:
        q = q.where(db.Job.state.in_(ACTIVE) if call.query["active"]
                    else db.Job.state.not_in(ACTIVE))
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(q)).scalars().all()
    kinds = call.services.jobs.kinds
    return reply({"jobs": [job_doc(j, kinds) for j in rows]})


async def _get(call: Call) -> db.Job:
    jid = call.params["id"]
    async with call.services.sessionmaker() as s:
        job = await s.get(db.Job, jid)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job with id {jid!r}",
                       "list jobs: siterecovery jobs list")
    return job


async def show_job(call: Call) -> web.Response:
    """With ``version`` and ``wait``, a long poll: answers as soon as the job's version
    differs from ``version``, or after ``wait`` seconds with the job as it is."""
    engine = call.services.jobs
    tick = engine.tick  # taken before reading: a change after the read sets it
    doc = job_doc(await _get(call), engine.kinds)
    known, wait = call.query.get("version"), float(call.query.get("wait", 0))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while doc["version"] == known and (left := deadline - loop.time()) > 0:
        await wait_tick(tick, left)
        tick = engine.tick
        doc = job_doc(await _get(call), engine.kinds)
    return reply(doc)


async def cancel_job(call: Call) -> web.Response:
    job = await _get(call)
    await call.services.jobs.cancel(job.id)
    return reply(job_doc(await _get(call), call.services.jobs.kinds))


ROUTES = [
    Route("GET", "/api/v1/jobs", list_jobs, "List jobs, newest first", "jobs",
          query={"target": TARGET, "kind": {"enum": sorted(KINDS)},
                 "state": {"enum": list(JOB_STATES)}, "active": {"type": "boolean"},
                 "limit": {"type": "integer", "minimum": 1, "maximum": 1000}},
          responses={200: obj({"jobs": array(JOB)}, ["jobs"])},
          description="target: a machine's name, or plan:NAME / group:NAME for a recovery "
                      "plan's or consistency group's jobs; active=true: queued or running "
                      "jobs only; limit defaults to 100."),
    Route("GET", "/api/v1/jobs/{id}", show_job, "Show a job with its steps", "jobs",
          params=_ID, responses={200: JOB},
          query={"version": {"type": "string", "maxLength": 64},
                 "wait": {"type": "number", "minimum": 0, "maximum": 60}},
          description="Long poll: with version (a job's version) and wait (seconds), answers "
                      "as soon as the job changes, or after wait seconds unchanged."),
    Route("POST", "/api/v1/jobs/{id}/cancel", cancel_job, "Cancel a queued or running job",
          "jobs", params=_ID, responses={200: JOB},
          description="Returns once the job is cancelled: its running step fails with "
                      "'cancelled by the operator' and the later steps are skipped. 409 if it "
                      "already ended or its kind cannot be cancelled."),
]
