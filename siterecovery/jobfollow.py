"""Following a job from a verb module (a leaf: ``*cmds`` modules do not import each
other): long-poll it to its end, each step's message on stderr as it changes."""

from __future__ import annotations

import sys
import time
from typing import Any

from siterecovery.apiclient import ApiClient

DONE = ("succeeded", "failed", "cancelled")


def describe_job(j: dict[str, Any]) -> str:
    """A job and its steps, one line each, and its error."""
    lines = [f"{j['title']} {j['target']}: {j['state']} (job {j['id']})"]
    lines += [f"  {s['title']}: {s['state']}" + (f" — {s['message']}" if s["message"] else "")
              for s in j["steps"]]
    if j["error"]:
        lines.append(f"error: {j['error']}")
    return "\n".join(lines)


async def follow(api: ApiClient, job: dict[str, Any], timeout: float | None
                 ) -> dict[str, Any]:
    """The job once it ended (or as it is after ``timeout`` seconds), long-polling. The
    time is the clock's: a long poll that returns early (the job changed) counts only
    what it waited."""
    seen: dict[str, str] = {}
    start = time.monotonic()
    while True:
        waited = time.monotonic() - start
        for s in job["steps"]:
            note = f"{s['state']} {s['message']}"
            if s["state"] != "pending" and seen.get(s["name"]) != note:
                seen[s["name"]] = note
                print(f"{s['title']}: {note}".rstrip(), file=sys.stderr, flush=True)
        if job["state"] in DONE or (timeout is not None and waited >= timeout):
            return job
        poll = 30.0 if timeout is None else max(1.0, min(30.0, timeout - waited))
        job = await api.get(f"/api/v1/jobs/{job['id']}", wait=int(poll), version=job["version"])
