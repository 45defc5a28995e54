"""Recovery plans: ordered groups of replicated items that are drilled, failed over,
cleaned up and committed together, as one job (``configserver/planjobs.py``).

A plan has a name, a description and groups, in order. A group lists replicated items
(an item may be in several plans, once per plan; up to ``MAX_ITEMS`` per plan, as ASR
allows) and optionally a script before and after its items (run on the configuration
server, ``configserver/planscripts.py``) and a manual action before and after them (a
text; the job waits until an operator confirms it). This module validates and stores
plans; a refusal is a ``DomainError`` naming what is wrong and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select

from configserver import db
from configserver.core import Core
from configserver.errors import Conflict, InvalidRequest, NotFound
from configserver.jobdefs import JOB_ID, active_kinds
from configserver.planmodels import RecoveryPlan
from configserver.schema import NAME, array, iso, nullable, obj

log = structlog.get_logger("configserver.plans")

MAX_ITEMS = 100  # per plan, as ASR allows
MAX_GROUPS = MAX_ITEMS  # a group holds at least one item
MAX_ACTION = 4000
MAX_DESCRIPTION = 1000
MAX_SCRIPT_ARGS = 32
DEFAULT_SCRIPT_TIMEOUT = 600
MAX_SCRIPT_TIMEOUT = 86400
JOB_TARGET = "plan:{name}"  # a plan job's target: never a machine's name

SCRIPT = obj({
    "path": {"type": "string", "pattern": "^/", "maxLength": 4096,
             "description": "an executable file on the configuration server (absolute)"},
    "args": {**array({"type": "string", "maxLength": 4096}), "maxItems": MAX_SCRIPT_ARGS},
    "timeout_seconds": {"type": "integer", "minimum": 1, "maximum": MAX_SCRIPT_TIMEOUT,
                        "description": f"killed after this long (default "
                                       f"{DEFAULT_SCRIPT_TIMEOUT}); the step fails"},
}, ["path"])
_ACTION = nullable({"type": "string", "minLength": 1, "maxLength": MAX_ACTION,
                    "description": "what the operator does; the job waits in the state "
                                   "'waiting' until POST /api/v1/jobs/{id}/resume"})
GROUP = obj({
    "name": {**NAME, "description": "default: group1, group2 ... in order"},
    "items": {**array(NAME), "minItems": 1, "maxItems": MAX_ITEMS,
              "description": "replicated items (machine names), recovered in parallel"},
    "pre_script": nullable(SCRIPT), "post_script": nullable(SCRIPT),
    "pre_action": _ACTION, "post_action": _ACTION,
}, ["items"])
_GROUPS = {**array(GROUP), "minItems": 1, "maxItems": MAX_GROUPS,
           "description": "in the order they run"}
_DESCRIPTION = {"type": "string", "maxLength": MAX_DESCRIPTION}
CREATE = obj({"name": NAME, "description": _DESCRIPTION, "groups": _GROUPS},
             ["name", "groups"])
UPDATE = {**obj({"description": _DESCRIPTION, "groups": _GROUPS}), "minProperties": 1}
_SCRIPT_DOC = nullable(obj({"path": {"type": "string"},
                            "args": array({"type": "string"}),
                            "timeout_seconds": {"type": "integer"}},
                           ["path", "args", "timeout_seconds"]))
GROUP_DOC = obj({"name": {"type": "string"}, "items": array({"type": "string"}),
                 "pre_script": _SCRIPT_DOC, "post_script": _SCRIPT_DOC,
                 "pre_action": nullable({"type": "string"}),
                 "post_action": nullable({"type": "string"})},
                ["name", "items", "pre_script", "post_script", "pre_action", "post_action"])
LAST_JOB = nullable(obj({"id": JOB_ID, "kind": {"type": "string"},
                         "state": {"type": "string"}}, ["id", "kind", "state"]))
PLAN = obj({"name": {"type": "string"}, "description": {"type": "string"},
            "groups": array(GROUP_DOC), "items": {"type": "integer"},
            "job_target": {"type": "string", "description": "the target of its jobs"},
            "last_job": LAST_JOB,
            "created": {"type": "string"}, "updated": {"type": "string"}},
           ["name", "description", "groups", "items", "job_target", "last_job", "created",
            "updated"])
REFUSALS = (
    f"more than {MAX_ITEMS} items in the plan: 422 plan_too_large",
    "an item twice in the plan: 422 plan_item_repeated",
    "an item that is not replicated: 422 plan_item_unknown",
    "two groups of one name: 422 plan_group_repeated",
    "a script that is not an executable file on the server: 422 plan_script_invalid",
)


def job_target(name: str) -> str:
    return JOB_TARGET.format(name=name)


def _no_plan(name: str) -> NotFound:
    return NotFound("plan_not_found", f"no recovery plan named {name!r}",
                    "list them: siterecovery plan list")


def _script(s: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    if s is None:
        return None
    path = Path(str(s["path"]))
    if not path.is_file() or not os.access(path, os.X_OK):
        raise InvalidRequest("plan_script_invalid", f"{where}: {path} is not an executable "
                             "file on the configuration server",
                             f"install it there and chmod +x {path}")
    return {"path": str(path), "args": [str(a) for a in s.get("args") or []],
            "timeout_seconds": int(s.get("timeout_seconds") or DEFAULT_SCRIPT_TIMEOUT)}


def normalise(plan: str, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups as stored (every field present); ``InvalidRequest`` for a plan too
    large, an item or a group name given twice, or a script that is not executable."""
    total = sum(len(g["items"]) for g in groups)
    if total > MAX_ITEMS:
        raise InvalidRequest("plan_too_large", f"plan {plan!r} lists {total} items; a plan "
                             f"holds at most {MAX_ITEMS}", "split it into several plans")
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for n, g in enumerate(groups, 1):
        name = str(g.get("name") or f"group{n}")
        if any(o["name"] == name for o in out):
            raise InvalidRequest("plan_group_repeated", f"plan {plan!r} has two groups named "
                                 f"{name!r}", "give each group its own name")
        for item in g["items"]:
            if item in seen:
                raise InvalidRequest("plan_item_repeated", f"item {item!r} is in plan "
                                     f"{plan!r} twice (groups {seen[item]} and {name})",
                                     "list each item in one group of the plan")
            seen[item] = name
        out.append({"name": name, "items": list(g["items"]),
                    "pre_script": _script(g.get("pre_script"), f"group {name} pre_script"),
                    "post_script": _script(g.get("post_script"), f"group {name} post_script"),
                    "pre_action": g.get("pre_action"), "post_action": g.get("post_action")})
    return out


async def _known_items(s: Any, plan: str, groups: list[dict[str, Any]]) -> None:
    wanted = [i for g in groups for i in g["items"]]
    found = set((await s.execute(select(db.ReplicatedItem.machine).where(
        db.ReplicatedItem.machine.in_(wanted)))).scalars())
    unknown = [i for i in wanted if i not in found]
    if unknown:
        raise InvalidRequest("plan_item_unknown", f"plan {plan!r}: {', '.join(unknown)} "
                             f"{'is' if len(unknown) == 1 else 'are'} not replicated",
                             "enable replication first: siterecovery replication enable "
                             "MACHINE, or leave it out of the plan")


async def _doc(s: Any, row: RecoveryPlan) -> dict[str, Any]:
    last = (await s.execute(select(db.Job).where(db.Job.target == job_target(row.name))
                            .order_by(db.Job.id.desc()).limit(1))).scalars().first()
    return {"name": row.name, "description": row.description, "groups": row.groups,
            "items": sum(len(g["items"]) for g in row.groups),
            "job_target": job_target(row.name),
            "last_job": None if last is None else {"id": last.id, "kind": last.kind,
                                                   "state": last.state},
            "created": iso(row.created), "updated": iso(row.updated)}


async def create(core: Core, body: dict[str, Any]) -> dict[str, Any]:
    name = str(body["name"])
    groups = normalise(name, body["groups"])
    now = core.clock()
    async with core.sessionmaker() as s:
        if await s.get(RecoveryPlan, name) is not None:
            raise Conflict("plan_exists", f"a recovery plan named {name!r} exists",
                           f"change it: siterecovery plan update {name}, or choose another "
                           "name")
        await _known_items(s, name, groups)
        row = RecoveryPlan(name=name, description=str(body.get("description") or ""),
                           groups=groups, created=now, updated=now)
        s.add(row)
        await s.commit()
        doc = await _doc(s, row)
    log.info("plan_created", plan=name, items=doc["items"], groups=len(groups))
    return doc


async def update(core: Core, name: str, body: dict[str, Any]) -> dict[str, Any]:
    groups = normalise(name, body["groups"]) if "groups" in body else None
    async with core.sessionmaker() as s:
        row = await s.get(RecoveryPlan, name, with_for_update=True)
        if row is None:
            raise _no_plan(name)
        if groups is not None:
            await _known_items(s, name, groups)
            row.groups = groups
        if "description" in body:
            row.description = str(body["description"])
        row.updated = core.clock()
        await s.commit()
        doc = await _doc(s, row)
    log.info("plan_updated", plan=name, fields=sorted(body))
    return doc


async def delete(core: Core, name: str) -> None:
    async with core.sessionmaker() as s:
        row = await s.get(RecoveryPlan, name, with_for_update=True)
        if row is None:
            raise _no_plan(name)
        if await active_kinds(s, job_target(name)):
            raise Conflict("plan_job_running", f"a job of plan {name!r} is running",
                           f"wait for it: siterecovery plan show {name}")
        await s.delete(row)
        await s.commit()
    log.info("plan_deleted", plan=name)


async def get(core: Core, name: str) -> dict[str, Any]:
    async with core.sessionmaker() as s:
        row = await s.get(RecoveryPlan, name)
        if row is None:
            raise _no_plan(name)
        return await _doc(s, row)


async def list_all(core: Core) -> list[dict[str, Any]]:
    async with core.sessionmaker() as s:
        rows = (await s.execute(select(RecoveryPlan).order_by(RecoveryPlan.name))).scalars()
        return [await _doc(s, r) for r in rows.all()]


async def stored(core: Core, name: str) -> RecoveryPlan:
    """The plan's row (``NotFound`` if none)."""
    async with core.sessionmaker() as s:
        row = await s.get(RecoveryPlan, name)
    if row is None:
        raise _no_plan(name)
    return row
