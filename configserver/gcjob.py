"""The Prune vault job: forget what no policy keeps, then collect the garbage (maps, packs
no point needs, repack of mostly-dead packs) — ``vault/prune.py`` under the vault's
exclusive lock, as a durable job on the target ``vault`` (so it never runs beside a
verification).

Its windows come from the policies, so it never thins what a policy keeps: policies keep
*every* point of their ``retention_hours`` (the process servers forget each machine's
points past its own policy, ``procserver/retention.py``), so the prune keeps every point
younger than the longest ``retention_hours`` of all policies (``windows``), and, as
always, each machine's newest point and newest app-consistent point. Started by hand
(``POST /api/v1/prune``) and every ``prune_interval_hours`` (0: off).

Its memory budget is the server's ``gc_memory_mib`` (vault/memory.py), recorded in the
job's ``memory_mib`` parameter when it is queued: past it the collection streams
(vault/prunestream.py), its temporary files in the system's temporary directory
($TMPDIR of the daemon). Same result either way.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import func, select

from configserver import db, vaultjobs
from configserver.core import Core
from configserver.jobdefs import JobKind, Step, StepFailed
from configserver.jobs import StepContext
from configserver.recoverysteps import open_vault
from vault.chain import BrokenChainError
from vault.errors import VaultError
from vault.locks import LockedError, locked
from vault.memory import DEFAULT_MEMORY_MIB, budget_bytes
from vault.prune import prune
from vault.retention import Retention

log = structlog.get_logger("configserver.prune")
TARGET = vaultjobs.TARGET
LOCK_WAIT = 600.0  # for the exclusive lock: uploads in progress end their cycles first


async def windows(core: Core) -> Retention:
    """Retention windows that keep every point any policy keeps (see the module's
    docstring). ``StepFailed`` if there is no policy (nothing says what to keep)."""
    async with core.sessionmaker() as s:
        longest = (await s.execute(select(func.max(db.Policy.retention_hours)))).scalar()
    if longest is None:
        raise StepFailed("no replication policy exists, so nothing says which points to "
                         "keep: create one (siterecovery policy create)")
    r = float(longest)
    return Retention(r, r, r, r)


async def _prune(ctx: StepContext) -> str:
    policy = await windows(ctx.core)
    dry_run = bool(ctx.params.get("dry_run", False))
    try:  # queued before the setting existed: the default
        memory = budget_bytes(ctx.params.get("memory_mib", DEFAULT_MEMORY_MIB))
    except ValueError as e:
        raise StepFailed(f"{e} (the job's memory_mib; set gc_memory_mib in "
                         "configserver.toml)") from None
    vault = await open_vault(ctx)

    def say(msg: str) -> None:
        log.info("prune_progress", job=ctx.job.id, message=msg)

    try:
        async with locked(vault, "exclusive", f"prune job {ctx.job.id}",
                          wait=float(ctx.params.get("lock_wait", LOCK_WAIT))):
            await ctx.progress(5, f"keeping every point of the last {policy.retention_hours:g} "
                                  "hours (the longest policy retention)")
            with ThreadPoolExecutor(2) as ex:
                report = await prune(vault, policy, ex, dry_run=dry_run, progress=say,
                                     now=datetime.fromtimestamp(ctx.core.clock(), UTC),
                                     memory=memory)
    except LockedError as e:
        raise StepFailed(f"the vault stayed locked: {e}") from None
    except BrokenChainError as e:
        raise StepFailed(f"a kept point's chain is broken, nothing was deleted: {e}; run "
                         "'siterecovery check' on the vault") from None
    except VaultError as e:
        raise StepFailed(f"cannot prune the vault: {e}") from None
    finally:
        await vault.close()
    verb = "would forget" if dry_run else "forgot"
    return (f"{verb} {len(report.forgotten)} point(s), kept {len(report.kept)}, rebased "
            f"{len(report.rebased)}; deleted {report.packs_deleted} pack(s) and "
            f"{report.maps_deleted} map(s), {report.bytes_deleted} bytes; repacked "
            f"{report.packs_repacked} into {report.packs_written}")


def budget(memory_mib: int) -> dict[str, Any]:
    """The job parameters of a memory budget in MiB (``gc_memory_mib``)."""
    return {"memory_mib": memory_mib}


async def request(core: Core, params: dict[str, Any]) -> db.Job:
    """Queue Prune vault with ``params`` (``dry_run``, ``scheduled``, ``budget``'s); the
    job."""
    return await vaultjobs.request(core, PRUNE, params, "prune_requested")


async def schedule_once(core: Core, interval_hours: float,
                        params: dict[str, Any] | None = None) -> db.Job | None:
    """A scheduled prune, when one is due (``vaultjobs.schedule_once``); ``params``:
    ``budget``'s (default: the vault's default budget)."""
    return await vaultjobs.schedule_once(core, PRUNE, interval_hours,
                                         params or budget(DEFAULT_MEMORY_MIB),
                                         "prune_requested")


async def schedule(core: Core, interval_hours: float, params: dict[str, Any] | None = None,
                   check_seconds: float = 60.0) -> None:
    """The in-daemon schedule of prunes (0 hours: off)."""
    await vaultjobs.schedule(core, PRUNE, interval_hours,
                             params or budget(DEFAULT_MEMORY_MIB), "prune_requested",
                             check_seconds)


PRUNE = JobKind("prune_vault", "Prune the vault",
                (Step("prune", "Forget what no policy keeps and collect garbage", _prune),))
KINDS = (PRUNE,)
