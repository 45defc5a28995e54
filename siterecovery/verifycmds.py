"""CLI verbs: ``verify run [--machine M] [--all] [--wait]`` and ``verify status``.

``run`` queues Verify recovery points on the configuration server (REST
``/api/v1/verify``): each point chosen is shown to restore to its recorded digests, under
the vault's shared lock (uploads go on). With ``--wait`` it follows the job and exits 1
when a point failed (the error names the damaged objects). ``status`` prints each
retained point's last verification. The server also runs it every
``verify_interval_hours`` (docs/REFERENCE.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from siterecovery.apiopts import add_api_args, call_and_show, client
from siterecovery.argtypes import wait_seconds
from siterecovery.errors import EXIT_FAIL
from siterecovery.jobfollow import describe_job, follow
from siterecovery.output import show


async def cmd_run(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"all": bool(args.all)}
    if args.machine:
        body["machine"] = args.machine
    async with client(args) as api:
        job = (await api.post("/api/v1/verify", body))["job"]
        if not args.wait:
            return show(job, args, f"{job['title']} queued: job {job['id']}\nfollow it: "
                                   f"siterecovery jobs wait {job['id']}")
        job = await follow(api, job, args.timeout)
    show(job, args, describe_job(job))
    return 0 if job["state"] == "succeeded" else EXIT_FAIL


def _when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t, dt.UTC).strftime(
        "%Y-%m-%d %H:%M:%SZ")


def describe_status(doc: dict[str, Any]) -> str:
    lines = [f"{doc['verified']} point(s) verified, {doc['failed']} failed"]
    last = doc["last_job"]
    if last is not None:
        lines.append(f"last run: job {last['id']} {last['state']}, ended {_when(last['ended'])}")
    for p in doc["points"]:
        lines.append(f"  {p['point'][:16]}  {p['machine'] or '?':<20} {_when(p['verified'])}  "
                     f"{'ok' if p['ok'] else 'FAILED'}")
        lines += [f"      {d['object']}: {d['reason']}" for d in p["damaged"]]
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace) -> int:
    params = {"machine": args.machine} if args.machine else {}
    return await call_and_show(args, "GET", "/api/v1/verify", describe_status, **params)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's verbs to the top-level subparsers."""
    v = sub.add_parser("verify", help="prove recovery points restore (verification jobs)",
                       description="Verification jobs prove that retained recovery points "
                                   "restore to their recorded digests, reading every block "
                                   "they need; a failed point raises the alert "
                                   "point_verification_failed naming the damaged objects.")
    vsub = v.add_subparsers(dest="verify_cmd", required=True, metavar="VERB")
    r = vsub.add_parser("run", help="queue a verification now",
                        description="Verifies the new points and those due for "
                                    "re-verification (verify_reverify_days, at most "
                                    "verify_daily_share_percent of them), or every point "
                                    "with --all.")
    r.add_argument("--machine", help="only this machine's points")
    r.add_argument("--all", action="store_true", help="every retained point, due or not")
    r.add_argument("--wait", action="store_true",
                   help="follow the job to its end (exit 1 if a point failed)")
    r.add_argument("--timeout", type=wait_seconds, metavar="SECONDS",
                   help="stop waiting after this long (the job goes on)")
    r.set_defaults(func=cmd_run)
    s = vsub.add_parser("status", help="each retained point's last verification")
    s.add_argument("--machine", help="only this machine's points")
    s.set_defaults(func=cmd_status)
    for p in (r, s):
        add_api_args(p)
