"""Route: an agent's answer to a failback's request to write a point onto its disks
(``failback_request`` in its settings; the job is ``configserver/failback.py``)."""

from __future__ import annotations

import structlog
from aiohttp import web

from configserver import db
from configserver.agentwatch import FAILBACK
from configserver.rest import ApiError, Call, Route, nullable, obj, reply

log = structlog.get_logger("configserver.failback")
_COUNT = {"type": "integer", "minimum": 0, "maximum": 1 << 50}
FAILBACK_ANSWER = obj({
    "request": {"type": "string", "minLength": 1, "maxLength": 64},
    "point": {"type": "string", "minLength": 1, "maxLength": 128},
    "error": nullable({"type": "string", "maxLength": 2000, "description": (
        "why the point could not be written (null: written and verified)")}),
    "blocks_compared": _COUNT, "blocks_written": _COUNT, "bytes_written": _COUNT,
    "stage": {"enum": ["writing", "done"], "description": (
        "writing: a progress report (percent); done (the default): the result")},
    "percent": {"type": "number", "minimum": 0, "maximum": 100},
}, ["request", "point"])


async def answer(call: Call) -> web.Response:
    """Recorded on the item's failback; the job's step waiting for it goes on."""
    name, b = str(call.peer), call.body
    now = call.services.clock()
    async with call.services.sessionmaker() as s:
        machine = await s.get(db.Machine, name, with_for_update=True)
        if machine is not None:
            machine.last_contact = now
        item = await s.get(db.ReplicatedItem, name, with_for_update=True)
        rec = dict(item.failover or {}) if item is not None else {}
        fb = dict(rec.get(FAILBACK) or {})
        if item is None or fb.get("request") != b["request"] or fb.get("point") != b["point"]:
            raise ApiError(409, "no_failback_request", f"no failback of {name!r} asked for "
                           f"point {b['point']!r} with id {b['request']!r}",
                           "only a running failback asks for it (its settings' "
                           "failback_request)")
        if b.get("stage") == "writing":
            if fb.get("reported"):  # late: the result is in
                return reply({"request": b["request"], "recorded": False})
            item.failover = {**rec, FAILBACK: {**fb, "percent": b.get("percent") or 0.0}}
            await s.commit()
            log.info("agent_failback_progress", machine=name, request=b["request"],
                     percent=b.get("percent"))
            await call.services.notify()
            return reply({"request": b["request"], "recorded": True})
        fb.update(reported=now, error=b.get("error"), percent=100.0,
                  **{k: int(b.get(k) or 0) for k in (
                      "blocks_compared", "blocks_written", "bytes_written")})
        item.failover = {**rec, FAILBACK: fb}
        await s.commit()
    log.info("agent_failback_reported", machine=name, request=b["request"], point=b["point"],
             blocks_written=b.get("blocks_written"), error=b.get("error"))
    await call.services.notify()
    return reply({"request": b["request"], "recorded": True})


ROUTES = [
    Route("POST", "/api/v1/agent/failback", answer,
          "An agent's answer to a failback's request", "agent", auth="agent",
          listeners=("site",), body=FAILBACK_ANSWER,
          responses={200: obj({"request": {"type": "string"}, "recorded": {"type": "boolean"}},
                              ["request", "recorded"])},
          description="Sent once the agent wrote the point onto its disks (only the blocks "
                      "that differed) and verified them, or with the error that stopped it. "
                      "409 no_failback_request when no running failback asked for it."),
]
