"""The push-install jobs: Install, Upgrade and Uninstall the Mobility agent of a machine.

The configuration server does not reach machines itself: each job's first step writes an
install request (``install_requests``, configserver/install.py) for the process server
assigned to the machine, which claims it, runs it over SSH (procserver/installreq.py) and
reports every step. The job's later steps mirror those reports one to one, so each is
visible with its own message; the last step of an install or upgrade waits for the
agent's first heartbeat. A job that ends early (failed, cancelled) ends its request in
the same transaction, and the process server stops at its next report.

Every step is idempotent: a configuration server restarted mid-job finds the request
where it was, and a process server restarted mid-request runs it again (an install of
what is installed verifies and changes nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.install import (
    ACTIONS,
    REMOTE_STEPS,
    STEP_TITLES,
    new_request,
    revoke_agent_certs,
)
from configserver.jobdefs import JobKind, JobRun, Step, StepFailed
from configserver.jobs import StepContext
from configserver.models import InstallRequest
from configserver.schema import iso

CLAIM_TIMEOUT_SECONDS = 300.0  # a process server that does not claim it by then is not polling
STEP_TIMEOUT_SECONDS = 1800.0
HEARTBEAT_TIMEOUT_SECONDS = 600.0
RECENT_CONTACT_SECONDS = 180.0  # three agent heartbeats: an agent that was already running
STALE_PROCSERVER_SECONDS = 900.0


async def _least_loaded(s: AsyncSession, now: float) -> db.ProcessServer | None:
    servers = (await s.execute(select(db.ProcessServer))).scalars().all()
    counts = dict((await s.execute(select(db.Machine.process_server, func.count())
                                   .group_by(db.Machine.process_server))).all())
    return min(servers, default=None,
               key=lambda p: (now - p.last_contact > STALE_PROCSERVER_SECONDS,
                              counts.get(p.name, 0), p.name))


async def validate(ctx: StepContext) -> str:
    """The machine (Linux), its account and its process server; then the request."""
    action = ctx.params["action"]
    async with ctx.core.sessionmaker() as s:
        m = await s.get(db.Machine, ctx.target, with_for_update=True)
        if m is None:
            raise StepFailed(f"machine {ctx.target!r} is no longer in the inventory")
        if m.os_type != "linux":
            raise StepFailed(f"machine {ctx.target!r} runs {m.os_type}: the Mobility agent "
                             "installs on Linux only for now")
        if not m.account:
            raise StepFailed(f"machine {ctx.target!r} has no push-install account; give it "
                             f"one: siterecovery machine update {ctx.target} --account NAME")
        if await s.get(db.Account, m.account) is None:
            raise StepFailed(f"the machine's account {m.account!r} no longer exists")
        if m.process_server is None:
            ps = await _least_loaded(s, ctx.core.clock())
            if ps is None:
                raise StepFailed("no process server is registered; start one (it registers "
                                 "with its first heartbeat), then run this again")
            m.process_server = ps.name
        else:
            ps = await s.get(db.ProcessServer, m.process_server)
            if ps is None:
                raise StepFailed(f"the machine's process server {m.process_server!r} is not "
                                 "registered: start it, or assign another one (siterecovery "
                                 f"machine update {ctx.target} --process-server NAME)")
        if ctx.params.get("forget_host_key"):
            m.host_key = m.host_key_source = m.host_key_recorded = None
        if ctx.params.get("host_key"):
            m.host_key, m.host_key_source = ctx.params["host_key"], "operator"
            m.host_key_recorded = ctx.core.clock()
        if await s.get(InstallRequest, ctx.job.id) is None:
            s.add(new_request(ctx.job.id, action, m, ps, ctx.params, ctx.core.clock()))
        await s.commit()
        key = "recorded " + (m.host_key_source or "") if m.host_key else \
            "none recorded: trusted on first use"
    await ctx.core.notify()
    return (f"{action} of the agent on {ctx.target} ({m.ip}) with account {m.account}, "
            f"by process server {ps.name}; host key: {key}")


async def wait_remote(ctx: StepContext, name: str,
                      show: Callable[[str], str] = lambda note: note) -> str:
    """The message of step ``name`` of the job's install request once the process server
    reported it succeeded; ``StepFailed`` with its message when it failed. Meanwhile the
    job's step shows ``show(what the process server is doing)``. A process server that
    stops heartbeating with the request claimed fails it (after a restart of this server,
    counted from the restart), so no request stays claimed by a process server that
    never comes back."""
    shown = [""]
    began = ctx.core.clock()

    async def reported() -> str | None:
        now = ctx.core.clock()  # before the read: the state seen is never older than now
        async with ctx.core.sessionmaker() as s:
            req = await s.get(InstallRequest, ctx.job.id)
            ps = await s.get(db.ProcessServer, req.procserver) if req is not None else None
        if req is None:
            raise StepFailed("the install request is gone (was the machine removed?)")
        st = dict(req.steps or {}).get(name) or {}
        if st.get("state") == "succeeded":
            return str(st.get("message") or "done")
        if st.get("state") == "failed" or req.state == "failed":
            raise StepFailed(str(st.get("message") or req.error or "failed"))
        if req.state == "pending" and now >= req.created + CLAIM_TIMEOUT_SECONDS:
            raise StepFailed(
                f"process server {req.procserver} did not take the request within "
                f"{CLAIM_TIMEOUT_SECONDS:.0f} s: is it running, with configserver_url "
                "set? (siterecovery procserver list)")
        silent = now - max(ps.last_contact if ps is not None else 0.0, began)
        if req.state == "claimed" and silent > STALE_PROCSERVER_SECONDS:
            raise StepFailed(
                f"process server {req.procserver} stopped while running the request (no "
                f"heartbeat for {silent:.0f} s): run this again once it is back (an install "
                "is idempotent), or assign another process server (siterecovery machine "
                f"update {req.machine} --process-server NAME)")
        note = show(str(st.get("message") or (
            f"waiting for process server {req.procserver}" if req.state == "pending"
            else f"process server {req.procserver} at work")))
        if note != shown[0]:
            shown[0] = note
            await ctx.progress(0.0, note)
        return None

    return await ctx.wait_for(reported, what=f"the process server's {name} step",
                              timeout=STEP_TIMEOUT_SECONDS)


def _remote(name: str) -> Callable[[StepContext], Coroutine[Any, Any, str | None]]:
    """A step the process server runs: wait for its report."""

    async def run(ctx: StepContext) -> str:
        return await wait_remote(ctx, name)

    return run


async def uninstall(ctx: StepContext) -> str:
    """The process server's uninstall; then the machine's agent certificates are revoked
    (an agent that was not uninstalled, or a copy of its key, is refused from now on)."""
    message = await wait_remote(ctx, "uninstall")
    serials = await revoke_agent_certs(ctx.core, ctx.target)
    return message + (f"; agent certificate(s) revoked: {', '.join(serials)}" if serials
                      else "; no agent certificate left to revoke")


async def first_heartbeat(ctx: StepContext) -> str:
    """The agent's first heartbeat after it was started (or a recent one, if it was
    running already and nothing changed), from the version installed: where no systemd
    restarts it, the old program may heartbeat until the operator restarts it."""
    async with ctx.core.sessionmaker() as s:
        req = await s.get(InstallRequest, ctx.job.id)
    steps = dict((req.steps or {}) if req else {})
    started = steps.get("start") or {}
    want = str((steps.get("install") or {}).get("version") or "")
    since = float(started.get("at") or ctx.job.created)
    if started.get("running_before"):
        since = min(since, ctx.job.created - RECENT_CONTACT_SECONDS)
    how = str(started.get("how") or "")
    shown = [""]

    async def contacted() -> str | None:
        async with ctx.core.sessionmaker() as s:
            m = await s.get(db.Machine, ctx.target)
        if m is None:
            raise StepFailed(f"machine {ctx.target!r} was removed from the inventory")
        if m.last_contact is None or m.last_contact < since:
            return None
        if want and m.agent_version != want:
            note = (f"agent {m.agent_version} checked in at {iso(m.last_contact)}, not the "
                    f"{want} installed: restart it" + (f" ({how})" if how else ""))
            if note != shown[0]:
                shown[0] = note
                await ctx.progress(0.0, note)
            return None
        return (f"agent {m.agent_version or '(version unknown)'} checked in at "
                f"{iso(m.last_contact)}")

    await ctx.progress(0.0, "waiting for the agent's first heartbeat"
                       + (f" ({how})" if how else ""))
    timeout = float(ctx.params.get("heartbeat_timeout_seconds") or HEARTBEAT_TIMEOUT_SECONDS)
    return await ctx.wait_for(contacted, what="the agent's first heartbeat (is it running? "
                              "can it reach the configuration server's site listener?)"
                              + (f"; {how}" if how else ""), timeout=timeout)


async def end_request(s: AsyncSession, job: JobRun, state: str) -> None:
    """Inside the transaction that ends ``job``: end its install request (if any) with it,
    so its process server stops at its next report."""
    req = await s.get(InstallRequest, job.id, with_for_update=True)
    if req is None or req.state in ("done", "failed", "cancelled"):
        return
    if state == "succeeded":
        req.state = "done"
    else:
        req.state = "cancelled" if state == "cancelled" else "failed"
        req.error = req.error or job.error or f"the job {state}"
    req.updated = job.updated


def _kind(action: str, title: str) -> JobKind:
    steps = [Step("validate", "Check the machine, its account and process server", validate)]
    steps += [Step(n, STEP_TITLES[n], uninstall if n == "uninstall" else _remote(n))
              for n in REMOTE_STEPS[action]]
    if action != "uninstall":
        steps.append(Step("first_heartbeat", "Wait for the agent's first heartbeat",
                          first_heartbeat))
    return JobKind(f"agent_{action}", title, tuple(steps), on_end=end_request)


INSTALL = _kind("install", "Install the Mobility agent")
UPGRADE = _kind("upgrade", "Upgrade the Mobility agent")
UNINSTALL = _kind("uninstall", "Uninstall the Mobility agent")
KINDS = (INSTALL, UPGRADE, UNINSTALL)
BY_ACTION = {k.name.removeprefix("agent_"): k for k in KINDS}
assert set(BY_ACTION) == set(ACTIONS)
