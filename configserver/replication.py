"""The replication jobs: Enable protection → Finalize protection, Disable protection.

Every step is idempotent (the engine re-runs a step that was running when the
server stopped) and reads what it needs from the catalog rather than from
memory.
"""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import assignment, db
from configserver.errors import DomainError
from configserver.install import REMOTE_STEPS, STEP_TITLES, push_action, request_for_job
from configserver.installjob import end_request, wait_remote
from configserver.items import ENABLING_STATES, ItemState, expected_disks
from configserver.jobdefs import JobKind, JobRun, Step, StepFailed
from configserver.jobs import StepContext
from configserver.models import InstallRequest
from configserver.schema import iso

AGENT_TIMEOUT_SECONDS = 3600.0  # how long Enable protection waits for the agent to check in
STALE_PROCSERVER_SECONDS = 900.0  # no heartbeat for 15 min: not chosen for new machines


async def _item(s: AsyncSession, machine: str) -> db.ReplicatedItem:
    item = await s.get(db.ReplicatedItem, machine)
    if item is None:
        raise StepFailed(f"machine {machine!r} has no replicated item any more (replication "
                         "was disabled)")
    return item


async def _set_state(ctx: StepContext, state: ItemState, *,
                     only_from: tuple[ItemState, ...] = ()) -> None:
    async with ctx.core.sessionmaker() as s:
        item = await _item(s, ctx.target)
        if item.state == state or (only_from and item.state not in only_from):
            return
        item.state, item.updated = state, ctx.core.clock()
        await s.commit()
    await ctx.core.notify()


# -- Enable protection --

async def validate(ctx: StepContext) -> str:
    """The machine, its policy and a process server for it."""
    policy_name = str(ctx.params.get("policy", "default"))
    async with ctx.core.sessionmaker() as s:
        machine = await s.get(db.Machine, ctx.target)
        if machine is None:
            raise StepFailed(f"machine {ctx.target!r} is no longer in the inventory")
        if not machine.enabled:
            raise StepFailed(f"machine {ctx.target!r} is disabled; enable it with "
                             f"'siterecovery machine update {ctx.target} --enable'")
        if machine.os_type != "linux":
            raise StepFailed(f"machine {ctx.target!r} runs {machine.os_type}; only Linux "
                             "machines can be protected for now")
        if await s.get(db.Policy, policy_name) is None:
            raise StepFailed(f"policy {policy_name!r} no longer exists")
        await _item(s, ctx.target)
        ps_name = machine.process_server
        if ps_name is not None:
            ps = await s.get(db.ProcessServer, ps_name)
            if ps is None:
                raise StepFailed(f"the machine's process server {ps_name!r} is not registered;"
                                 " start it (it registers with its first heartbeat) or assign "
                                 "another one: siterecovery machine update "
                                 f"{ctx.target} --process-server NAME")
        else:
            ps, why = await _least_loaded(s, ctx.core.clock())
            if ps is None:
                raise StepFailed("no process server is registered; start one (it registers "
                                 "with its first heartbeat), then enable replication again")
            machine.process_server = ps.name
        await s.commit()
    return f"machine {ctx.target}, policy {policy_name}, process server {ps.name} " \
           f"({ps.address})" + (f"; {why}" if ps_name is None else "")


async def _least_loaded(s: AsyncSession, now: float
                        ) -> tuple[db.ProcessServer | None, str]:
    """The least-loaded healthy process server and why (``configserver/assignment.py``);
    with none healthy, the one heard from last, and so said."""
    servers = (await s.execute(select(db.ProcessServer))).scalars().all()
    if not servers:
        return None, ""
    counts = {str(k): int(v) for k, v in (await s.execute(
        select(db.Machine.process_server, func.count()).group_by(db.Machine.process_server)
    )).all() if k is not None}
    choice = assignment.choose(servers, counts, now, 0.0)
    if choice.server is not None:
        return choice.server, choice.explanation
    newest = max(servers, key=lambda p: (p.last_contact, p.name))
    return newest, f"{choice.explanation}: taking {newest.name}, heard from last"


async def prepare_agent(ctx: StepContext) -> str:
    """Push the Mobility agent if it needs it, then wait for it to check in (heartbeat or
    settings call) after the job was created (after the pushed agent was started), at the
    version the push installed.

    A machine with a push-install account whose agent never checked in with a certificate
    it still holds gets an install request, one whose agent is older than its process
    server an upgrade request (configserver/install.py): the job's own request, followed
    step by step in this step's message. An agent that checked in at the right version is
    not reinstalled; a machine without an account waits for an agent installed by hand.
    """
    lines, push = await _push(ctx)
    since, want, how = ctx.job.created, "", ""
    if push is not None:
        async with ctx.core.sessionmaker() as s:
            req = await s.get(InstallRequest, ctx.job.id)
        steps = dict((req.steps or {}) if req else {})
        started = steps.get("start") or {}
        if not started.get("running_before"):  # its check-in comes after the new start
            since = max(since, float(started.get("at") or since))
        # Where no systemd restarts it, the old program may go on checking in: only the
        # version the install step reported counts.
        want = str((steps.get("install") or {}).get("version") or "")
        how = str(started.get("how") or "")
    shown = [""]

    async def checked_in() -> str | None:
        async with ctx.core.sessionmaker() as s:
            machine = await s.get(db.Machine, ctx.target)
            if machine is None:
                raise StepFailed(f"machine {ctx.target!r} was removed from the inventory")
            await _item(s, ctx.target)
        if machine.last_contact is None or machine.last_contact < since:
            return None
        if want and machine.agent_version != want:
            note = (f"agent {machine.agent_version or '(version unknown)'} checked in at "
                    f"{iso(machine.last_contact)}, not the {want} installed: restart it"
                    + (f" ({how})" if how else ""))
            if note != shown[0]:
                shown[0] = note
                await ctx.progress(0.0, "\n".join([*lines, note]))
            return None
        return f"agent {machine.agent_version or '(version unknown)'} checked in at " \
               f"{iso(machine.last_contact)}"

    await ctx.progress(0.0, "\n".join([*lines, "waiting for the Mobility agent to check in"]))
    found = await ctx.wait_for(checked_in, what="the Mobility agent to check in (is it "
                               "installed, enrolled and running? siterecovery mobility "
                               "enroll)", timeout=AGENT_TIMEOUT_SECONDS)
    return "\n".join([*lines, found])


async def _push(ctx: StepContext) -> tuple[list[str], str | None]:
    """The push install of this job (its request's steps, one line each), or why there is
    none; and the action pushed (None: nothing pushed)."""
    async with ctx.core.sessionmaker() as s:
        req = await s.get(InstallRequest, ctx.job.id)  # a step run again follows it on
        machine = await s.get(db.Machine, ctx.target)
        if machine is None:
            raise StepFailed(f"machine {ctx.target!r} was removed from the inventory")
        if req is not None:
            action: str | None = req.action
        elif not machine.account:
            return [f"machine {ctx.target} has no push-install account: waiting for an agent "
                    f"installed by hand (or give it one to have the agent pushed: "
                    f"siterecovery machine update {ctx.target} --account NAME)"], None
        else:
            action = await push_action(s, machine, ctx.core.clock())
        if action is None:
            return [f"agent {machine.agent_version or '(version unknown)'} installed and "
                    "up to date: not reinstalled"], None
    params = {k: ctx.params[k] for k in ("site_url", "server") if ctx.params.get(k)}
    if "site_url" not in params:
        raise StepFailed("this job has no site URL to give the pushed agent (it was queued "
                         "by an older configuration server): disable replication and enable "
                         "it again")
    try:
        await request_for_job(ctx.core, ctx.job.id, action, ctx.target, params)
    except DomainError as e:
        raise StepFailed(f"{e.message} ({e.hint})" if e.hint else e.message) from None
    lines = [f"push {action} of the agent by its process server"]
    for name in REMOTE_STEPS[action]:
        title = STEP_TITLES[name]

        def show(note: str, title: str = title) -> str:
            return "\n".join([*lines, f"{title}: {note}"])

        try:
            message = await wait_remote(ctx, name, show)
        except StepFailed as e:
            raise StepFailed(f"{title}: {e}") from None
        lines.append(f"{title}: {message}")
    return lines, action


async def initial_replication(ctx: StepContext) -> str:
    """Wait until the agent reported every disk at 100 % and the first recovery point since
    Enable protection is in the catalog. The agent reports any cycle while the item is
    being enabled: a full copy, or a delta (or resync) where it already holds a basis
    (protection enabled again on an agent that kept its maps), whose point ends this."""
    await _set_state(ctx, ItemState.INITIAL_REPLICATION, only_from=(ItemState.ENABLING,))

    async def done() -> str | None:
        async with ctx.core.sessionmaker() as s:
            item = await _item(s, ctx.target)
            machine = await s.get(db.Machine, ctx.target)
            if machine is None:
                raise StepFailed(f"machine {ctx.target!r} was removed from the inventory")
            if item.state not in ENABLING_STATES:
                raise StepFailed(f"the item is {item.state}, not in initial replication")
            progress = dict(item.disk_progress or {})
            disks = expected_disks(machine, progress)
            copied = bool(disks) and all(progress.get(d, 0.0) >= 100.0 for d in disks)
            point = item.latest_point
        if copied and point is not None:
            return f"{len(disks)} disk(s) copied; first recovery point {point}"
        percent = min(item.initial_progress, 99.0 if point is None else 100.0)
        await ctx.progress(percent, "waiting for the first recovery point" if copied
                           else f"copying {len(disks)} disk(s)" if disks
                           else "waiting for the agent's first progress report")
        return None

    return await ctx.wait_for(done, what="initial replication")


async def _enable_ended(s: AsyncSession, job: JobRun, state: str) -> None:
    await end_request(s, job, state)  # the push install it asked for, if any
    if state == "succeeded":
        return
    item = await s.get(db.ReplicatedItem, job.target)
    if item is not None and item.state in ENABLING_STATES:
        item.state, item.health = ItemState.ENABLE_FAILED, "critical"
        item.health_errors = [job.error or f"{job.kind} {state}"]
        item.updated = job.updated


ENABLE = JobKind(
    "enable_protection", "Enable protection",
    (Step("validate", "Prerequisites check", validate),
     Step("prepare_agent", "Prepare the Mobility agent", prepare_agent),
     Step("initial_replication", "Initial replication", initial_replication)),
    then="finalize_protection", on_end=_enable_ended)


# -- Finalize protection --

async def record_first_point(ctx: StepContext) -> str:
    async with ctx.core.sessionmaker() as s:
        item = await _item(s, ctx.target)
        if item.latest_point is None:
            raise StepFailed("the item has no recovery point yet")
        point = await s.get(db.RecoveryPoint, item.latest_point)
        if point is None:
            raise StepFailed(f"recovery point {item.latest_point} is not in the catalog")
    return f"first recovery point {point.id} ({point.consistency}-consistent, {point.created})"


async def mark_protected(ctx: StepContext) -> str:
    async with ctx.core.sessionmaker() as s:
        item = await _item(s, ctx.target)
        if item.state in ENABLING_STATES:
            item.state, item.initial_progress = ItemState.PROTECTED, 100.0
            item.health, item.health_errors = "normal", []
            item.updated = ctx.core.clock()
            await s.commit()
        elif item.state != ItemState.PROTECTED:
            raise StepFailed(f"the item is {item.state}; it cannot become protected")
    await ctx.core.notify()
    return "protected; delta replication continues"


FINALIZE = JobKind(
    "finalize_protection", "Finalize protection",
    (Step("record_first_point", "Record the first recovery point", record_first_point),
     Step("mark_protected", "Mark the item protected", mark_protected)),
    on_end=_enable_ended)


# -- Disable protection --

async def stop_replication(ctx: StepContext) -> str:
    async with ctx.core.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, ctx.target)
        if item is None:
            return "no replicated item (already removed)"
        if item.state != ItemState.DISABLING:
            item.state, item.updated = ItemState.DISABLING, ctx.core.clock()
            await s.commit()
    await ctx.core.notify()
    return "the agent's settings no longer ask it to replicate"


async def remove_item(ctx: StepContext) -> str:
    async with ctx.core.sessionmaker() as s:
        await s.execute(delete(db.ReplicatedItem).where(
            db.ReplicatedItem.machine == ctx.target))
        await s.commit()
    await ctx.core.notify()
    return "replicated item removed; its recovery points stay in the vault until retention " \
           "removes them"


DISABLE = JobKind(
    "disable_protection", "Disable protection",
    (Step("stop_replication", "Stop replication", stop_replication),
     Step("remove_item", "Remove the replicated item", remove_item)),
    cancellable=False)  # quick, and a half-disabled item could neither be enabled nor used

ENABLE_KINDS = (ENABLE.name, FINALIZE.name)
KINDS = (ENABLE, FINALIZE, DISABLE)
