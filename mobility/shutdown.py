"""A failover's request to shut the source down: a last delta cycle, the answer, then
the machine's shutdown command.

The configuration server asks through the settings the agent pulls
(``shutdown_request``). The agent takes one more cycle (so that, with the point
``latest``, nothing written before the shutdown is lost), tells the configuration
server which cycle that was (or why there is none), and only then runs
``shutdown_command``: the failover learns the last cycle before the machine goes down.
A request is answered once: its id is kept in the state directory before the command
runs, so a command that fails is not repeated every round (its failure is reported).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from common.backoff import Backoff
from common.fs import atomic_write
from common.subproc import communicate
from mobility.agent import Agent, CycleResult
from mobility.siteclient import SiteClient, SiteError, SiteRefused

log = structlog.get_logger("mobility.shutdown")

ANSWERED = "shutdown-request"  # in the state directory: the id of the answered request
ATTEMPTS = 5  # answers tried before the shutdown goes on without one
COMMAND_TIMEOUT_SECONDS = 120.0


def answered(state_dir: str | Path) -> str | None:
    """The id of the request this agent answered last, if any."""
    try:
        return (Path(state_dir) / ANSWERED).read_text().strip() or None
    except FileNotFoundError:
        return None


async def _answer(site: SiteClient, request: str, stage: str, cycle: str | None,
                  error: str | None) -> bool:
    backoff = Backoff(1.0, 10.0)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            await site.report_shutdown(request, stage, cycle, error)
            return True
        except SiteRefused as e:
            if e.status < 500:  # no such request any more: nobody waits for the answer
                log.warning("shutdown_answer_refused", request=request, error=str(e))
                return False
            log.warning("shutdown_answer_failed", request=request, error=str(e),
                        attempt=attempt, of=ATTEMPTS)
            if attempt < ATTEMPTS:
                await backoff.sleep()
        except SiteError as e:
            log.warning("shutdown_answer_failed", request=request, error=str(e),
                        attempt=attempt, of=ATTEMPTS)
            if attempt < ATTEMPTS:
                await backoff.sleep()
    return False


async def _run(command: list[str]) -> str | None:
    """Run the shutdown command; None when it succeeded, else why it failed."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except OSError as e:
        return f"{command[0]}: {e.strerror or e}"
    try:
        out, _ = await communicate(proc, COMMAND_TIMEOUT_SECONDS)
    except TimeoutError:
        return f"{' '.join(command)} did not end within {COMMAND_TIMEOUT_SECONDS:.0f} s"
    if proc.returncode:
        tail = out.decode(errors="replace").strip()[-500:]
        return f"{' '.join(command)} exited with {proc.returncode}" + (f": {tail}" if tail
                                                                        else "")
    return None


async def shut_down(agent: Agent, site: SiteClient, request: str,
                    command: list[str]) -> CycleResult | None:
    """Answer the failover's ``request``: a last cycle, the answer, ``command``. Returns
    the last cycle (None if it failed: the shutdown goes on, a failover waits for no one)."""
    log.info("shutdown_requested", request=request)
    last: CycleResult | None = None
    error: str | None = None
    try:
        last = await agent.replicate_once()
    except Exception as e:  # the machine still goes down: the failover is under way
        error = str(e) or type(e).__name__
        log.warning("last_cycle_failed", request=request, error=error)
    told = await _answer(site, request, "shutting_down", last.cycle if last else None, error)
    await asyncio.to_thread(atomic_write, agent.state_dir / ANSWERED, request + "\n")
    log.info("shutting_down", request=request, command=command, told=told,
             cycle=last.cycle if last else None)
    failed = await _run(command)
    if failed is not None:
        log.error("shutdown_failed", request=request, error=failed,
                  hint="shut the machine down by hand: a failover is under way")
        await _answer(site, request, "shutdown_failed", last.cycle if last else None, failed)
    return last
