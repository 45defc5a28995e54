"""What a job is: its kinds and steps, its row as the engine holds it, its API document.

The engine that runs jobs is ``configserver/jobs.py``; the replication kinds are in
``configserver/replication.py``; the kinds a server runs are listed in
``configserver/jobkinds.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.schema import iso, nullable, obj

if TYPE_CHECKING:
    from configserver.core import Core
    from configserver.jobs import StepContext

JOB_STATES = ("queued", "running", "waiting", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running", "waiting")
RUNNING = ("running", "waiting")  # started; waiting: a step waits for an operator
STEP_STATES = ("pending", "running", "succeeded", "failed", "skipped")


async def active_kinds(s: AsyncSession, target: str) -> list[str]:
    """The kinds of ``target``'s jobs that are queued, running or waiting."""
    return list((await s.execute(select(db.Job.kind).where(
        db.Job.target == target, db.Job.state.in_(ACTIVE)))).scalars().all())


class StepFailed(Exception):
    """A step cannot succeed; the message is what the operator reads in the job."""


@dataclass(frozen=True)
class Step:
    name: str   # stable identifier (logs, API)
    title: str  # what an operator reads
    run: Callable[[StepContext], Coroutine[Any, Any, str | None]]  # returns its final message


@dataclass(frozen=True)
class JobKind:
    name: str
    title: str
    steps: tuple[Step, ...]
    cancellable: bool = True
    then: str | None = None  # the kind queued for the same target when this one succeeds
    # Called inside the transaction that ends the job, with its final state.
    on_end: Callable[[AsyncSession, JobRun, str], Awaitable[None]] | None = None
    # Called once an operator's cancel has ended the job (no transaction open), with the
    # engine's ``cancel``: a recovery plan's job cancels the item jobs it queued.
    after_cancel: Callable[[Core, JobRun, Callable[[str], Awaitable[None]]],
                           Awaitable[None]] | None = None
    # Steps that depend on the job's parameters (a recovery plan's groups and items):
    # when set, a job's steps are ``steps_for(params)`` and ``steps`` is unused.
    steps_for: Callable[[dict[str, Any]], tuple[Step, ...]] | None = None

    def steps_of(self, params: dict[str, Any]) -> tuple[Step, ...]:
        return self.steps if self.steps_for is None else self.steps_for(params)


def by_name(kinds: Iterable[JobKind]) -> dict[str, JobKind]:
    """The kinds keyed by name; a name given twice is a programming error."""
    out: dict[str, JobKind] = {}
    for kind in kinds:
        assert kind.name not in out, kind.name
        out[kind.name] = kind
    for kind in out.values():
        assert kind.then is None or kind.then in out, (kind.name, kind.then)
    return out


@dataclass
class JobRun:
    """The engine's copy of one job row."""

    id: str
    kind: str
    target: str
    state: str
    params: dict[str, Any]
    steps: list[dict[str, Any]]
    progress: float
    error: str | None
    created: float
    started: float | None
    ended: float | None
    updated: float
    attempts: int

    @classmethod
    def of(cls, row: db.Job) -> JobRun:
        return cls(row.id, row.kind, row.target, row.state, dict(row.params or {}),
                   [dict(s) for s in row.steps or []], row.progress, row.error, row.created,
                   row.started, row.ended, row.updated, row.attempts)

    def values(self) -> dict[str, Any]:
        return {"state": self.state, "steps": [dict(s) for s in self.steps],
                "progress": self.progress, "error": self.error, "started": self.started,
                "ended": self.ended, "updated": self.updated, "attempts": self.attempts}

    def recompute_progress(self) -> None:
        if not self.steps:
            return
        done = sum(100.0 if s["state"] in ("succeeded", "skipped") else
                   float(s.get("progress") or 0.0) if s["state"] == "running" else 0.0
                   for s in self.steps)
        self.progress = round(done / len(self.steps), 2)


_lock = threading.Lock()
_last = [0, 0]  # (ms, counter) of the last id


def new_job_id() -> str:
    """A UUIDv7 (RFC 9562): the first 48 bits are the creation time in ms and the next 12 a
    counter, so ids sort in creation order even when the injected clock stands still."""
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last[0]:
            ms, counter = _last[0], _last[1] + 1
            if counter > 0xFFF:
                ms, counter = ms + 1, 0
        else:
            counter = 0
        _last[:] = [ms, counter]
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
    return str(uuid.UUID(int=value))


def new_job(kind: JobKind, target: str, params: dict[str, Any], now: float) -> db.Job:
    """A queued job row; add it to a session, commit, then ``Core.notify()``."""
    steps = [{"name": s.name, "title": s.title, "state": "pending", "started": None,
              "ended": None, "progress": 0.0, "message": "", "attempts": 0}
             for s in kind.steps_of(params)]
    return db.Job(id=new_job_id(), kind=kind.name, target=target, state="queued",
                  params=params, steps=steps, progress=0.0, error=None, created=now,
                  started=None, ended=None, updated=now, attempts=0)


JOB_ID = {"type": "string",
          "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"}
STEP = obj({"name": {"type": "string"}, "title": {"type": "string"},
            "state": {"enum": list(STEP_STATES)}, "started": nullable({"type": "string"}),
            "ended": nullable({"type": "string"}), "progress": {"type": "number"},
            "message": {"type": "string"}, "attempts": {"type": "integer"}},
           ["name", "title", "state", "started", "ended", "progress", "message", "attempts"])
JOB = obj({"id": {"type": "string"}, "kind": {"type": "string"}, "title": {"type": "string"},
           "target": {"type": "string"}, "state": {"enum": list(JOB_STATES)},
           "cancellable": {"type": "boolean"},
           "params": {"type": "object"}, "steps": {"type": "array", "items": STEP},
           "progress": {"type": "number"}, "error": nullable({"type": "string"}),
           "created": {"type": "string"}, "started": nullable({"type": "string"}),
           "ended": nullable({"type": "string"}), "updated": {"type": "string"},
           "attempts": {"type": "integer"},
           "version": {"type": "string", "description": "changes whenever the job does"}},
          ["id", "kind", "title", "target", "state", "cancellable", "params", "steps",
           "progress", "error", "created", "started", "ended", "updated", "attempts",
           "version"])


def job_doc(job: db.Job | JobRun, kinds: Mapping[str, JobKind]) -> dict[str, Any]:
    """The API view of a job; ``kinds`` gives titles and cancellability."""
    kind = kinds.get(job.kind)
    doc = {
        "id": job.id, "kind": job.kind, "title": kind.title if kind else job.kind,
        "target": job.target, "state": job.state,
        "cancellable": bool(kind and kind.cancellable) and job.state in ACTIVE,
        "params": dict(job.params or {}),
        "steps": [{"name": s["name"], "title": s.get("title", s["name"]), "state": s["state"],
                   "started": iso(s.get("started")), "ended": iso(s.get("ended")),
                   "progress": float(s.get("progress") or 0.0),
                   "message": str(s.get("message") or ""),
                   "attempts": int(s.get("attempts") or 0)} for s in job.steps or []],
        "progress": job.progress, "error": job.error, "created": iso(job.created),
        "started": iso(job.started), "ended": iso(job.ended), "updated": iso(job.updated),
        "attempts": job.attempts,
    }
    doc["version"] = hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(),
                                     digest_size=8).hexdigest()
    return doc
