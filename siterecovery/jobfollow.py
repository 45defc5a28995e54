"""Following a job from a verb module (a leaf: ``*cmds`` modules do not import each
other): long-poll it to its end, each step's message on stderr as it changes."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from siterecovery.apiclient import ApiClient
from siterecovery.apiopts import client
from siterecovery.errors import EXIT_FAIL
from siterecovery.output import show

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


async def start_and_follow(args: argparse.Namespace, path: str, what: str,
                           body: dict[str, Any]) -> int:
    """POST ``body`` (None and False values left out) to ``path``, which queues a job for
    ``what``; with ``--wait`` follow it to its end. Exit 0 only if it succeeded. A 0 is
    sent as given (``0 in (None, False)`` is true in Python: the server says what it
    means, or refuses it)."""
    body = {k: v for k, v in body.items() if v is not None and v is not False}
    async with client(args) as api:
        job = (await api.post(path, body))["job"]
        if not args.wait:
            return show(job, args, f"{job['title']} queued for {what}: job {job['id']}\n"
                                   f"follow it: siterecovery jobs wait {job['id']}")
        job = await follow(api, job, args.timeout)
    show(job, args, describe_job(job))
    return 0 if job["state"] == "succeeded" else EXIT_FAIL
