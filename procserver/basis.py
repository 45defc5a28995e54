"""Resync against the vault: what the process server answers to an agent's BASIS.

An agent that lost its fingerprint map (a reinstalled agent, a wiped state
directory), or whose base cycle this process server no longer knows (its cache was
lost or replaced), would otherwise resend every block of every disk. Instead it asks
for a *basis*: the machine's newest recovery point in the vault, read back block by
block into the fingerprints the agent computes itself, checked against the digest
recorded with the point. The agent then sends a delta cycle on that point: only the
blocks that differ.

Each disk is read back and sent ``resync_range_blocks`` at a time
(``vault/fpstream.py``): what is held grows with that range, not with the disk. The
last range of a disk is sent only once the whole map matched the point's digest; a
mismatch found then is an ``ERROR code=no_basis`` after some MAP frames, and the agent
drops what it received.

The point must still exist and have the agent's disk layout; the answer names the
point's cycle, which is recorded here (for a process server that never saw it) so
the delta cycle's BEGIN and its upload resolve their base like any other. Anything
that prevents a trustworthy basis (no point yet, another layout, a damaged point)
is answered with ``ERROR code=no_basis``: the agent falls back to a full cycle.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select

from procserver import db
from vault.errors import MissingObjectError, VaultError
from vault.fpstream import fingerprint_ranges
from vault.locks import locked
from vault.point import Point
from wire.checks import validate_disks
from wire.protocol import FrameType, encode_json, error_frame, map_frames

if TYPE_CHECKING:
    from procserver.session import Session

log = structlog.get_logger("procserver.basis")
LOCK_WAIT = 600.0
# Cycles of the machine already acknowledged but still being uploaded are waited for
# this long, so that the basis is the newest point; after that, the newest uploaded.
UPLOAD_WAIT = 60.0


class NoBasisError(Exception):
    """No point of this machine can serve as the basis of a resync."""


def _layout(disks: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    return {d["name"]: (d["size"], d["block_size"]) for d in disks}


def _point_layout(p: Point) -> dict[str, tuple[int, int]]:
    return {d.disk: (d.size, d.block_size) for d in p.disks}


async def newest_point(session: Session) -> Point | None:
    """The machine's newest whole point: the newest this server uploaded, else the
    newest in the vault (a process server with a new, empty cache)."""
    deps, machine = session.deps, session.machine
    vault = deps.vaults.vault
    async with deps.sessionmaker() as s:
        ids = (await s.execute(select(db.Cycle.point_id).where(
            db.Cycle.machine == machine, db.Cycle.state == db.UPLOADED,
            db.Cycle.point_id.is_not(None)).order_by(db.Cycle.seq.desc()).limit(1))
        ).scalars().all()
    for pid in ids:
        assert pid is not None
        try:
            return await vault.read_point(pid)
        except MissingObjectError:
            break  # pruned since: look in the vault
    points = await vault.list_points(machine)
    return points[-1] if points else None


async def named_point(session: Session, point_id: object) -> Point:
    """The point ``point_id`` of the session's machine (a restore names it)."""
    if not isinstance(point_id, str) or not point_id.isalnum() or len(point_id) > 128:
        raise NoBasisError(f"{point_id!r} is not a point id")
    try:
        point = await session.deps.vaults.vault.read_point(point_id)
    except MissingObjectError:
        raise NoBasisError(f"the vault holds no point {point_id[:16]}") from None
    if point.machine != session.machine:
        raise NoBasisError(f"point {point_id[:16]} is not one of {session.machine!r}'s")
    return point


async def _uploads_settled(session: Session) -> None:
    deps, machine = session.deps, session.machine
    points_changed = deps.uploader.points_changed
    try:
        async with asyncio.timeout(UPLOAD_WAIT), points_changed:
            while True:
                async with deps.sessionmaker() as s:
                    pending = (await s.execute(select(db.Cycle.seq).where(
                        db.Cycle.machine == machine, db.Cycle.state == db.COMPLETE).limit(1))
                    ).first()
                if pending is None:
                    return
                await points_changed.wait()
    except TimeoutError:
        session.log.warning("resync_basis_not_newest", hint="acknowledged cycles of this "
                            "machine are still being uploaded; the newest uploaded point "
                            "serves as the basis")


async def _record_base(session: Session, p: Point) -> None:
    """Make the point's cycle a known, uploaded base cycle of this machine."""
    async with session.deps.sessionmaker() as s:
        row = (await s.execute(select(db.Cycle).where(db.Cycle.id == p.cycle))
               ).scalar_one_or_none()
        if row is not None:
            if row.machine != p.machine or row.state not in (db.COMPLETE, db.UPLOADED):
                raise NoBasisError(f"cycle {p.cycle} of point {p.id[:16]} is recorded here "
                                   f"as {row.state} for {row.machine!r}")
            if row.state == db.COMPLETE:
                row.state, row.point_id = db.UPLOADED, p.id
        else:
            disks = [{"name": d.disk, "size": d.size, "block_size": d.block_size}
                     for d in p.disks]
            s.add(db.Cycle(id=p.cycle, machine=p.machine, state=db.UPLOADED,
                           full=p.base is None, base=None, point_id=p.id,
                           begin_doc=json.dumps({"cycle": p.cycle, "disks": disks,
                                                 "basis": True}),
                           created=time.time()))
        await s.commit()


async def serve_basis(session: Session, doc: dict[str, Any]) -> None:
    """Answer a BASIS frame: the point's description, then each disk's MAP frames."""
    validate_disks(doc.get("disks"), "BASIS")
    deps, machine = session.deps, session.machine
    vaults = deps.vaults
    await deps.trust.authorize_disks(machine, [d["name"] for d in doc["disks"]])
    want = _layout(doc["disks"])
    if not vaults.ready.is_set():
        session.log.info("resync_basis_unavailable", reason="the vault is not open")
        await session.send(error_frame("no_basis", "the process server cannot reach its "
                                       "vault yet", "send a full cycle"))
        return
    await _uploads_settled(session)
    try:
        async with locked(vaults.vault, "shared", f"resync basis {machine}",
                          wait=LOCK_WAIT):
            named = doc.get("point") if "restore" in session.features else None
            point = await named_point(session, named) if named else await newest_point(session)
            if point is None:
                raise NoBasisError(f"the vault holds no recovery point of {machine!r} yet")
            if named:  # a restore: the point's own sizes, the same disks and block size
                want = {d.disk: (d.size, d.block_size) for d in point.disks}
                if {n: bs for n, (_, bs) in want.items()} != {
                        n: bs for n, (_, bs) in _layout(doc["disks"]).items()}:
                    raise NoBasisError(f"point {point.id[:16]} has other disks or another "
                                       "block size than this machine's")
            elif _point_layout(point) != want:
                raise NoBasisError(f"the newest point {point.id[:16]} has another disk "
                                   "layout (disks, sizes or block size changed)")
            await _record_base(session, point)
            order = [d["name"] for d in doc["disks"]]
            await session.send(encode_json(FrameType.BASIS, {
                "cycle": point.cycle, "point": point.id, "created": point.created,
                "disks": [{"name": n, "blocks": -(-want[n][0] // want[n][1]),
                           **({"size": want[n][0], "block_size": want[n][1],
                               "digest": point.disk(n).digest} if named else {})}
                          for n in order]}))
            index = await vaults.refresh_index()
            started = time.monotonic()
            span = deps.settings.resync_range_blocks
            for idx, name in enumerate(order):
                async for first, fps in fingerprint_ranges(
                        vaults.vault, point, name, index=index, executor=deps.executor,
                        span=span):
                    for frame in map_frames(idx, fps, first):
                        await session.send(frame)
    except NoBasisError as e:
        session.log.info("resync_basis_unavailable", reason=str(e))
        await session.send(error_frame("no_basis", str(e), "send a full cycle"))
        return
    except VaultError as e:
        # Damaged or unreadable: never offer a basis that may not match the point.
        session.log.error("resync_basis_failed", error=str(e), error_type=type(e).__name__)
        await session.send(error_frame("no_basis", f"the newest point could not be read "
                                       f"back: {e}", "send a full cycle"))
        return
    deps.metrics.resync_bases.inc()
    session.log.info("resync_basis_sent", point=point.id, cycle=point.cycle,
                     seconds=round(time.monotonic() - started, 3))
