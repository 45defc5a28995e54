"""A consistency group recovered to one of its group points: test failover, its cleanup,
failover and commit of every member in one job; and brought back the same way:
re-protect and failback of every member in one job (no group point: each member's own
recovered machine is what it takes; failback all members together).

The job is a plan job (``configserver/planjobs.py``) of one group holding every member,
with each member's own point of the group point (``grouppoints.point_doc``) given to its
item job, so each member recovers exactly the moment its group shared. A group point is
usable once it is ``complete`` (every member's point is in the catalog); without one named,
the newest complete group point is used. The checks on the members' states are the
plans' (``planops.queue``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from configserver import db
from configserver.core import Core
from configserver.errors import Conflict, NotFound
from configserver.groupmodels import ConsistencyGroup, GroupPoint
from configserver.grouppoints import point_doc
from configserver.groups import job_target, members_of, no_group
from configserver.jobdefs import JobKind
from configserver.planops import Whole, queue

AT_POINT = ("test-failover", "failover")  # the verbs that recover to a group point


async def _group_point(core: Core, name: str, wanted: str | None) -> dict[str, Any]:
    """The group point ``wanted`` (or the newest complete one), complete."""
    async with core.sessionmaker() as s:
        q = select(GroupPoint).where(GroupPoint.group_name == name)
        if wanted:
            q = q.where(GroupPoint.id == wanted)
        rows = (await s.execute(q.order_by(GroupPoint.created.desc()))).scalars().all()
        for row in rows:
            doc = await point_doc(s, row)
            if doc["state"] == "complete":
                return doc
            if wanted:
                raise Conflict("group_point_not_complete", f"group point {wanted} of "
                               f"{name!r} is {doc['state']}: "
                               + (doc["error"] or "a member's point is not in the catalog "
                                                  "yet"),
                               f"choose a complete one: siterecovery group points {name}")
    if wanted:
        raise NotFound("group_point_not_found", f"group {name!r} has no group point "
                       f"{wanted!r}", f"list them: siterecovery group points {name}")
    raise Conflict("no_group_point", f"group {name!r} has no complete group point yet",
                   f"wait for its next interval, then: siterecovery group points {name}")


async def request(core: Core, kinds: Mapping[str, JobKind], verb: str, name: str,
                  body: dict[str, Any]) -> tuple[db.Job, str | None]:
    """Queue the job of ``verb`` for every member of group ``name``; the job and the group
    point it recovers to (None for cleanup and commit)."""
    async with core.sessionmaker() as s:
        if await s.get(ConsistencyGroup, name) is None:
            raise no_group(name)
        members = await members_of(s, name)
    if not members:
        raise Conflict("group_empty", f"group {name!r} has no members",
                       f"add some: siterecovery group add {name} MACHINE")
    points, gp = None, None
    if verb in AT_POINT:
        doc = await _group_point(core, name, body.get("group_point"))
        gp = str(doc["id"])
        points = {m["machine"]: str(m["point"]) for m in doc["members"]}
        missing = [m for m in members if m not in points]
        if missing:
            raise Conflict("group_point_not_complete", f"group point {gp} of {name!r} has "
                           f"no point of {', '.join(missing)} (a member added since)",
                           f"wait for the group's next point: siterecovery group points "
                           f"{name}")
        members = [m for m in members if m in points]
    item_body = {k: v for k, v in body.items() if k != "group_point"}
    job = await queue(core, kinds, verb, Whole(
        f"group {name!r}", job_target(name), name,
        [{"name": name, "items": members, "pre_script": None, "post_script": None,
          "pre_action": None, "post_action": None}],
        f"wait for it: siterecovery group show {name}",
        f"take them out of the group: siterecovery group remove {name} MACHINE", points),
        item_body)
    return job, gp
