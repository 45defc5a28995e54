"""Which machine an agent's check-in comes from: the original, or the copy a failover
recovered.

A recovered machine boots from the original's disks, so its agent holds the original's
certificate and checks in as the same machine. What differs is the machine it runs on:
agents report its SMBIOS UUID (``host_id``, mobility/hostid.py). The first one reported
is the machine's (``machines.host_id``). While the item is failed over (any of
``FAILOVER_STATES``) only a check-in from the original's host is the original's; any
other is the **recovered** machine's — one with another host id, one with a host id
when the original never reported any (an older agent, or a machine without SMBIOS: the
original does not start reporting one halfway through a failover), and one without a
host id when the original always reported its own. After the failover, a host a
failover recovered (``recovered_hosts``) stays the recovered machine's. The recovered
machine:

- is never sent the original's shutdown or failback requests, and its heartbeats and
  progress reports leave the machine and the item alone (they go to the failover
  record's ``recovered_agent``);
- replicates only once a Re-protect through its agent (``reprotect --agent``) asked
  for it, and until a failback begins: its first cycle is a resync by basis on the point
  it started from (``basis_point``), then deltas on its own maps; each of its points
  becomes the re-protect's newest (``point_reported``), which failback then starts from.

Outside a failover another host id means the machine itself moved (new hardware, a VM
re-created): it is recorded, with a warning event (a clone of a protected machine
checking in as it would show up there).

When neither the original nor the caller reports a host id, nothing tells them apart:
the check-in is taken for the original's, as before host ids.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from configserver import db
from configserver.core import Core
from configserver.items import FAILOVER_STATES, ItemState
from configserver.rest import ApiError

log = structlog.get_logger("configserver.hostroles")

ORIGINAL, RECOVERED = "original", "recovered"
KEPT_HOSTS = 8  # recovered hosts remembered per item (a failover's, and earlier ones')
HOST_ID = {"type": "string", "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                                        "[0-9a-f]{12}$", "description": (
    "the machine's SMBIOS UUID (/sys/class/dmi/id/product_uuid, lowercase): tells the "
    "original machine from the copy a failover recovered")}
# Where a re-protect through the recovered machine's agent lets it replicate.
REVERSE_STATES = (ItemState.FAILED_OVER, ItemState.COMMITTED, ItemState.REPROTECTED)


def _failover(item: db.ReplicatedItem | None) -> dict[str, Any]:
    return dict(item.failover or {}) if item is not None else {}


def role(machine: db.Machine, item: db.ReplicatedItem | None, host_id: str | None) -> str:
    """``RECOVERED`` for a check-in from the recovered copy of ``machine``."""
    if host_id == machine.host_id:  # the original's host, or neither says which it is
        return ORIGINAL
    if item is not None and item.state in FAILOVER_STATES:
        return RECOVERED
    if host_id is None or machine.host_id is None:
        return ORIGINAL  # an agent without host ids, or the machine's first report
    return RECOVERED if host_id in (_failover(item).get("recovered_hosts") or []) \
        else ORIGINAL


async def refuse_recovered(s: AsyncSession, name: str, host_id: str | None,
                           what: str) -> None:
    """``ApiError`` 409 ``recovered_machine`` when the caller is the recovered copy of
    machine ``name``: ``what`` is the original's alone (its certificate's renewal: a
    renewal revokes the certificate both agents hold)."""
    machine = await s.get(db.Machine, name)
    if machine is None:
        return
    if role(machine, await s.get(db.ReplicatedItem, name), host_id) == RECOVERED:
        raise ApiError(409, "recovered_machine", f"host {host_id or '(no host id)'} runs "
                       f"the recovered copy of {name!r}: {what} is the original machine's",
                       "nothing to do: the copy goes on with the certificate it has")


def note_original(s: AsyncSession, machine: db.Machine, host_id: str | None,
                  now: float) -> None:
    """Record the original machine's host id (a change of it with a warning event)."""
    if host_id is None or host_id == machine.host_id:
        return
    if machine.host_id is not None:
        s.add(db.Event(time=now, severity="warning", code="machine_host_changed",
                       target=machine.name, active=False, message=(
                           f"{machine.name}'s agent now runs on host {host_id} (it ran on "
                           f"{machine.host_id}): the machine moved to other hardware or a "
                           "new VM, or a copy of it checks in as it")))
        log.warning("machine_host_changed", machine=machine.name, host_id=host_id,
                    was=machine.host_id)
    machine.host_id = host_id


def note_recovered(item: db.ReplicatedItem, host_id: str | None, now: float,
                   agent_version: str | None = None,
                   progress: dict[str, float] | None = None) -> None:
    """The recovered machine's agent checked in (with its version, or its progress):
    kept in the failover record."""
    rec = _failover(item)
    agent = dict(rec.get("recovered_agent") or {})
    agent.update(host_id=host_id, last_contact=now)
    if agent_version is not None:
        agent["agent_version"] = agent_version
    if progress is not None:
        agent["progress"] = progress
    hosts = [h for h in rec.get("recovered_hosts") or [] if h != host_id]
    if host_id is not None:
        hosts = [*hosts, host_id][-KEPT_HOSTS:]
    item.failover = {**rec, "recovered_agent": agent, "recovered_hosts": hosts}


def reverse(item: db.ReplicatedItem | None) -> dict[str, Any] | None:
    """A re-protect through the recovered machine's agent under way: its record."""
    rp = _failover(item).get("reprotect") or {}
    if item is None or item.state not in REVERSE_STATES or rp.get("ended") is not None:
        return None
    return rp if rp.get("via") == "agent" else None


def basis_point(item: db.ReplicatedItem) -> str | None:
    """What the recovered machine's first cycle compares its disks with: the re-protect's
    newest point, else the failover point it started from."""
    rec = _failover(item)
    found = (rec.get("reprotect") or {}).get("last_point") or rec.get("point")
    return str(found) if found else None


def reverse_point(item: db.ReplicatedItem, doc: dict[str, Any], now: float) -> bool:
    """Record a reported point as the re-protect's newest when it is the recovered
    machine's: a re-protect through its agent is under way and the point builds on the
    re-protect's newest or on the failover point (or is whole). Whether it changed."""
    rp = reverse(item)
    if rp is None:
        return False
    rec = _failover(item)
    if doc.get("base") not in (rp.get("last_point"), rec.get("point"), None):
        return False
    if doc["id"] == rp.get("last_point"):
        return False
    item.failover = {**rec, "reprotect": {
        **rp, "last_point": str(doc["id"]), "points": int(rp.get("points") or 0) + 1,
        "last_full": doc.get("base") is None, "updated": now}}
    return True


async def point_reported(core: Core, doc: dict[str, Any]) -> None:
    """A point reached the catalog: the re-protect's newest if the recovered machine's
    agent made it (``reverse_point``)."""
    async with core.sessionmaker() as s:
        item = await s.get(db.ReplicatedItem, str(doc["machine"]), with_for_update=True)
        if item is not None and reverse_point(item, doc, core.clock()):
            await s.commit()
            log.info("reverse_point_recorded", machine=item.machine, point=doc["id"])
            await core.notify()
