"""Routes: replication policies.

A policy says how a protected machine replicates: a crash-consistent point every
``crash_consistent_interval_seconds``, an app-consistent one every
``app_consistent_frequency_seconds`` (0: never), points kept for
``retention_hours``, an RPO alert when the newest point is older than
``rpo_threshold_seconds`` (it only alerts; replication goes on), and the block
size disks are split into; optionally the agents' send limit (``sendlimit.py``:
work/off-hours Mbit/s, overriding each agent's own). Each field has bounds (the JSON schema) and the
fields must fit together (``cross_field_problems``). The "default" policy exists
from the first start and cannot be deleted; a policy a replicated item uses
cannot be deleted, nor can its block size change (that would force every such
machine into a full resync).
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from configserver import db, sendlimit
from configserver.defaults import DEFAULT_POLICY, POLICY_DEFAULTS
from configserver.rest import NAME, ApiError, Call, Route, array, iso, not_found, obj, reply

log = structlog.get_logger("configserver.policies")

MAX_RETENTION_HOURS = 15 * 24  # as ASR: up to 15 days of recovery points
BLOCK_SIZES = [1 << n for n in range(16, 21)]  # 64 KiB .. 1 MiB, what the vault accepts

FIELDS: dict[str, dict[str, Any]] = {
    "rpo_threshold_seconds": {
        "type": "integer", "minimum": 60, "maximum": 86400,
        "description": "raise an RPO alert when an item's newest recovery point is older "
                       "than this (alert only; 60 s to 24 h)"},
    "retention_hours": {
        "type": "integer", "minimum": 1, "maximum": MAX_RETENTION_HOURS,
        "description": "how long recovery points are kept (1 h to 15 days)"},
    "app_consistent_frequency_seconds": {
        "type": "integer", "minimum": 0, "maximum": 12 * 3600,
        "description": "an app-consistent point (pre/post freeze hooks) this often; 0: off. "
                       "A multiple of crash_consistent_interval_seconds, up to 12 h and "
                       "within the retention"},
    "crash_consistent_interval_seconds": {
        "type": "integer", "minimum": 5, "maximum": 86400,
        "description": "a crash-consistent point this often (5 s up to the RPO threshold)"},
    "block_size": {
        "type": "integer", "enum": BLOCK_SIZES,
        "description": "bytes per block: a power of two from 64 KiB to 1 MiB"},
}
# The columns have shorter names than the API fields.
COLUMNS = {"rpo_threshold_seconds": "rpo_threshold_s", "retention_hours": "retention_hours",
           "app_consistent_frequency_seconds": "app_consistent_frequency_s",
           "crash_consistent_interval_seconds": "crash_consistent_interval_s",
           "block_size": "block_size"}

SEND_LIMIT = "send_limit"
CREATE = {**obj({"name": NAME, **FIELDS,
                 SEND_LIMIT: {**sendlimit.GIVEN, "description": sendlimit.DESCRIPTION}},
                ["name"]),
          "description": "fields left out take the defaults: " + ", ".join(
              f"{k}={v}" for k, v in POLICY_DEFAULTS.items())}
UPDATE = {**obj({**FIELDS, SEND_LIMIT: {
    **sendlimit.GIVEN, "description": sendlimit.DESCRIPTION + " (null removes it)"}}),
    "minProperties": 1}
POLICY = obj({"name": {"type": "string"},
              **{k: {"type": "integer"} for k in FIELDS},
              SEND_LIMIT: {**sendlimit.SHOWN, "description": sendlimit.DESCRIPTION},
              "items": {"type": "integer", "description": "replicated items using it"},
              "created": {"type": "string"}, "updated": {"type": "string"}},
             ["name", *FIELDS, SEND_LIMIT, "items", "created", "updated"])
DELETED = obj({"deleted": {"type": "string"}}, ["deleted"])


def cross_field_problems(p: dict[str, int]) -> list[str]:
    """What is wrong with a whole policy whose fields are each in bounds; each message names
    the fields and what would be valid."""
    out = []
    rpo, ret_s = p["rpo_threshold_seconds"], p["retention_hours"] * 3600
    crash, app = p["crash_consistent_interval_seconds"], p["app_consistent_frequency_seconds"]
    if crash > rpo:
        out.append(f"crash_consistent_interval_seconds ({crash}) must not exceed "
                   f"rpo_threshold_seconds ({rpo}), or every item would be in RPO alert "
                   f"between two points: use an interval of at most {rpo} s or a threshold "
                   f"of at least {crash} s")
    if crash > ret_s:
        out.append(f"crash_consistent_interval_seconds ({crash}) must not exceed the "
                   f"retention (retention_hours {p['retention_hours']} = {ret_s} s)")
    if app:
        if app < crash or app % crash:
            lo = max(crash, app // crash * crash)
            choices = sorted({lo, lo + crash} if app > crash else {crash})
            valid = [str(c) for c in choices if c <= min(ret_s, 12 * 3600)]
            out.append(f"app_consistent_frequency_seconds ({app}) must be 0 (off) or a "
                       f"multiple of crash_consistent_interval_seconds ({crash}), app-"
                       "consistent points being taken in place of crash-consistent ones"
                       + (f": e.g. {' or '.join(valid)}" if valid else ""))
        if app > ret_s:
            out.append(f"app_consistent_frequency_seconds ({app}) must not exceed the "
                       f"retention (retention_hours {p['retention_hours']} = {ret_s} s), "
                       "or no app-consistent point would be kept: use at most "
                       f"{ret_s // crash * crash} or raise retention_hours to "
                       f"{-(-app // 3600)}")
    return out


def _values(row: db.Policy) -> dict[str, int]:
    return {k: int(getattr(row, c)) for k, c in COLUMNS.items()}


def _doc(row: db.Policy, items: int) -> dict[str, Any]:
    return {"name": row.name, **_values(row), SEND_LIMIT: row.send_limit, "items": items,
            "created": iso(row.created), "updated": iso(row.updated)}


def _send_limit(given: dict[str, Any] | None) -> dict[str, Any] | None:
    try:
        return sendlimit.normalize(given)
    except ValueError as e:
        raise ApiError(422, "invalid_policy", f"send_limit: {e}",
                       "work_days like 'mon-fri' or 'mon,wed,fri'; work_hours like "
                       "'08:00-18:00'") from None


def _check(values: dict[str, int]) -> None:
    problems = cross_field_problems(values)
    if problems:
        raise ApiError(422, "invalid_policy", "; ".join(problems),
                       "each field's bounds are in the policy schema in /openapi.json")


async def _users(s: Any, name: str) -> list[str]:
    rows = await s.execute(select(db.ReplicatedItem.machine)
                           .where(db.ReplicatedItem.policy == name)
                           .order_by(db.ReplicatedItem.machine))
    return list(rows.scalars().all())


async def create_policy(call: Call) -> web.Response:
    body: dict[str, Any] = call.body
    name = body["name"]
    values = {k: int(body.get(k, v)) for k, v in POLICY_DEFAULTS.items()}
    _check(values)
    limit = _send_limit(body.get(SEND_LIMIT))
    now = call.services.clock()
    async with call.services.sessionmaker() as s:
        exists = ApiError(409, "policy_exists", f"a policy named {name!r} already exists",
                          f"change it with PATCH /api/v1/policies/{name} (siterecovery "
                          "policy update) or pick another name")
        if await s.get(db.Policy, name) is not None:
            raise exists
        row = db.Policy(name=name, created=now, updated=now, send_limit=limit,
                        **{COLUMNS[k]: v for k, v in values.items()})
        s.add(row)
        try:
            await s.commit()
        except IntegrityError:
            raise exists from None
    log.info("policy_created", policy=name, send_limit=limit, **values)
    return reply(_doc(row, 0), 201)


async def list_policies(call: Call) -> web.Response:
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(select(db.Policy).order_by(db.Policy.name))).scalars().all()
        counts = {str(policy): int(n) for policy, n in (await s.execute(
            select(db.ReplicatedItem.policy, func.count())
            .group_by(db.ReplicatedItem.policy))).all()}
    return reply({"policies": [_doc(r, counts.get(r.name, 0)) for r in rows]})


async def show_policy(call: Call) -> web.Response:
    name = call.params["name"]
    async with call.services.sessionmaker() as s:
        row = await s.get(db.Policy, name)
        if row is None:
            raise not_found("policy", name, "list them: siterecovery policy list")
        users = await _users(s, name)
    return reply(_doc(row, len(users)))


async def update_policy(call: Call) -> web.Response:
    name = call.params["name"]
    changes: dict[str, int] = {k: int(v) for k, v in call.body.items() if k != SEND_LIMIT}
    limit_given = SEND_LIMIT in call.body
    limit = _send_limit(call.body.get(SEND_LIMIT))
    async with call.services.sessionmaker() as s:
        row = await s.get(db.Policy, name, with_for_update=True)
        if row is None:
            raise not_found("policy", name, "list them: siterecovery policy list")
        values = {**_values(row), **changes}
        _check(values)
        users = await _users(s, name)
        if users and values["block_size"] != row.block_size:
            raise ApiError(409, "policy_in_use", f"the block size of policy {name!r} cannot "
                           f"change while {len(users)} replicated item(s) use it: "
                           f"{', '.join(users[:10])}",
                           "a new block size means a full resync: create another policy "
                           "with it and protect the machines again under that policy")
        for k, v in changes.items():
            setattr(row, COLUMNS[k], v)
        if limit_given:
            row.send_limit = limit
        row.updated = call.services.clock()
        await s.commit()
    log.info("policy_updated", policy=name, **changes,
             **({SEND_LIMIT: limit} if limit_given else {}))
    await call.services.notify()  # agents' settings follow their policy
    return reply(_doc(row, len(users)))


async def delete_policy(call: Call) -> web.Response:
    name = call.params["name"]
    if name == DEFAULT_POLICY:
        raise ApiError(409, "default_policy", "the default policy cannot be deleted: "
                       "replication uses it when no policy is named",
                       "change it instead: siterecovery policy update default ...")
    async with call.services.sessionmaker() as s:
        row = await s.get(db.Policy, name, with_for_update=True)
        if row is None:
            raise not_found("policy", name, "list them: siterecovery policy list")
        users = await _users(s, name)
        if users:
            raise ApiError(409, "policy_in_use", f"policy {name!r} is used by {len(users)} "
                           f"replicated item(s): {', '.join(users[:10])}",
                           "disable replication of those machines first (siterecovery "
                           "replication disable MACHINE)")
        await s.delete(row)
        await s.commit()
    log.info("policy_deleted", policy=name)
    return reply({"deleted": name})


_NAME_PARAM = {"name": NAME}
# The cross-field rules of ``cross_field_problems`` and ``_send_limit``, which no JSON
# schema can state (422 invalid_policy).
POLICY_REFUSALS = (
    "crash_consistent_interval_seconds exceeds rpo_threshold_seconds or the retention "
    "(retention_hours x 3600 s)",
    "app_consistent_frequency_seconds is neither 0 nor a multiple of "
    "crash_consistent_interval_seconds, or exceeds the retention",
    "send_limit's work_days or work_hours do not parse (like 'mon-fri', '08:00-18:00')")
ROUTES = [
    Route("POST", "/api/v1/policies", create_policy, "Create a replication policy", "policies",
          body=CREATE, responses={201: POLICY}, refusals=POLICY_REFUSALS),
    Route("GET", "/api/v1/policies", list_policies, "List replication policies", "policies",
          responses={200: obj({"policies": array(POLICY)}, ["policies"])}),
    Route("GET", "/api/v1/policies/{name}", show_policy, "Show a replication policy",
          "policies", params=_NAME_PARAM, responses={200: POLICY}),
    Route("PATCH", "/api/v1/policies/{name}", update_policy,
          "Change some fields of a replication policy", "policies", params=_NAME_PARAM,
          body=UPDATE, responses={200: POLICY}, refusals=POLICY_REFUSALS,
          description="The result is validated as a whole (fields not given keep their "
                      "stored values). The block size of a policy in use "
                      "cannot change (409 policy_in_use). send_limit replaces the whole "
                      "limit; null removes it (agents fall back to their own)."),
    Route("DELETE", "/api/v1/policies/{name}", delete_policy, "Delete a replication policy",
          "policies", params=_NAME_PARAM, responses={200: DELETED},
          description="Refused (409) for the default policy and for a policy a replicated "
                      "item uses."),
]
