"""A failback's request, as the managed agent answers it: write the point onto the disks
(``mobility/inplace.py``), report the progress, then the result.

The configuration server asks through the settings the agent pulls
(``failback_request {request, point}``). While the disks are compared and written the
agent reports its progress on ``POST /api/v1/agent/failback`` (stage ``writing``, every
10 %: the compare is the first half of each disk, the writes the second), then the
result (stage ``done``: the counts, or the error). The answered request's id is kept in
the state directory once the configuration server has the result, so it is answered
once. A result that could not be delivered (the configuration server down, or killed
and restarted meanwhile: its job resumes and waits for the answer) is kept in the state
directory (``failback-result``) and delivered again at the next rounds as it is, counts
included, without writing anything again; an error is not kept: the next round runs the
failback again, which writes only what still differs (``mobility/inplace.py``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import structlog

from common.fs import atomic_write
from mobility.agent import Agent
from mobility.inplace import failback
from mobility.siteclient import Settings, SiteClient, SiteError

log = structlog.get_logger("mobility.failback")
ANSWERED = "failback-request"  # in the state directory: the id of the answered request
RESULT = "failback-result"  # in the state directory: a result not delivered yet
STEP = 10  # percent between progress reports


def asked_to_fail_back(settings: Settings, state_dir: str | Path) -> bool:
    """A failback asks for a point this agent has not answered yet."""
    req = settings.failback_request
    if req is None:
        return False
    try:
        done = (Path(state_dir) / ANSWERED).read_text().strip()
    except FileNotFoundError:
        done = ""
    return done != req["request"]


class _Reporter:
    """The progress of every disk, sent at each ``STEP`` percent, one report at a time."""

    def __init__(self, site: SiteClient, request: str, point: str, disks: list[str]) -> None:
        self.site, self.request, self.point = site, request, point
        self.share = dict.fromkeys(disks, 0.0)  # per disk, 0-100
        self.changed = asyncio.Event()
        self.sent = -1
        self.closed = False

    def __call__(self, disk: str, phase: str, done: int, total: int) -> None:
        part = done / total if total else 1.0
        self.share[disk] = 50.0 * part + (50.0 if phase == "write" else 0.0)
        self.changed.set()

    def percent(self) -> float:
        return sum(self.share.values()) / max(1, len(self.share))

    def close(self) -> None:
        """No report after the one under way (if any): the result comes next."""
        self.closed = True
        self.changed.set()

    async def run(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            if self.closed:
                return
            pct = self.percent()
            if int(pct) // STEP <= self.sent:
                continue
            self.sent = int(pct) // STEP
            try:
                await self.site.report_failback_progress(self.request, self.point,
                                                         round(pct, 1))
            except SiteError as e:  # progress is a courtesy: the writes go on
                log.warning("failback_progress_report_failed", error=str(e))


def _kept(state_dir: Path, req: dict[str, str]) -> dict[str, int] | None:
    """The counts of this request's result, written but not delivered yet."""
    try:
        doc = json.loads((state_dir / RESULT).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(doc, dict) or (doc.get("request"), doc.get("point")) != (
            req["request"], req["point"]) or not isinstance(doc.get("counts"), dict):
        return None
    return {str(k): int(v) for k, v in doc["counts"].items()}


async def answer_failback(agent: Agent, site: SiteClient, settings: Settings) -> None:
    """Write the point a failback asks for, reporting the progress, and answer."""
    req = settings.failback_request
    assert req is not None
    state_dir = Path(agent.cfg.state_dir)
    kept = _kept(state_dir, req)
    if kept is not None:
        log.info("failback_result_delivered_again", request=req["request"],
                 point=req["point"], **kept)
        await _deliver(site, state_dir, req, None, kept)
        return
    log.info("failback_requested", request=req["request"], point=req["point"])
    error: str | None = None
    counts = {"blocks_compared": 0, "blocks_written": 0, "bytes_written": 0}
    reporter = _Reporter(site, req["request"], req["point"],
                         [d["name"] for d in agent.cfg.disks])
    reporting = asyncio.create_task(reporter.run())
    try:
        r = await failback(agent, req["point"], reporter)
        counts = {"blocks_compared": sum(d.blocks_compared for d in r.disks),
                  "blocks_written": r.blocks_written, "bytes_written": r.bytes_written}
    except Exception as e:  # every failure is answered: the job must not wait for nothing
        error = str(e) or type(e).__name__
        log.error("failback_failed", request=req["request"], point=req["point"], error=error)
    finally:
        reporter.close()  # a report under way ends, never cut off: then the result
        await reporting
    if error is None:  # the disks hold the point: kept until the answer is delivered
        atomic_write(state_dir / RESULT, json.dumps({
            "request": req["request"], "point": req["point"], "counts": counts}))
    await _deliver(site, state_dir, req, error, counts)


async def _deliver(site: SiteClient, state_dir: Path, req: dict[str, str],
                   error: str | None, counts: dict[str, int]) -> None:
    try:
        await site.report_failback(req["request"], req["point"], error, counts)
    except SiteError as e:
        log.warning("failback_report_failed", error=str(e),
                    hint="delivered again at the next round" if error is None else
                    "the failback runs again at the next round (what still differs)")
        return
    atomic_write(state_dir / ANSWERED, req["request"])
    (state_dir / RESULT).unlink(missing_ok=True)
