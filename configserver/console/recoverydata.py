"""What the console's plan and group pages read: recovery plans and consistency groups
with their items' states, their group points and jobs, and the verbs those states allow.

The documents are the REST API's (``plans.get``, ``groups.get``, ``grouppoints.point_doc``,
the items' and jobs' routes through ``data.Reader``); ``offered`` and ``withheld`` say
which forms a page shows, and which it does not and why, from ``planops.verdicts``: the
very rule ``planops.queue`` applies (the server checks again on a post).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select

from configserver import grouppoints, groups, planops, plans
from configserver.console.data import Reader
from configserver.groupmodels import GroupPoint
from configserver.jobs import ACTIVE
from configserver.planops import Verdict
from configserver.services import Services

# The verbs of a whole plan or group, in the order their forms are shown.
VERBS = ("test-failover", "cleanup-test-failover", "failover", "commit", "reprotect",
         "failback")
DESTRUCTIVE = ("failover", "commit", "failback")  # the plan's or group's name is typed
GROUP_POINTS_SHOWN = 20  # the newest group points a group's page lists and offers
JOBS_SHOWN = 20


def offered(verdicts: Mapping[str, Verdict], jobs: Sequence[dict[str, Any]]
            ) -> tuple[str, ...]:
    """The verbs whose forms a page shows: those ``planops.queue`` would accept now with
    something left to do (``Verdict.useful``: every item may take the verb or is passed
    by as done, at least one takes it), while no job of the plan or group runs."""
    if any(j["state"] in ACTIVE for j in jobs):
        return ()
    return tuple(v for v in VERBS if v in verdicts and verdicts[v].useful)


def withheld(verdicts: Mapping[str, Verdict], jobs: Sequence[dict[str, Any]]
             ) -> list[Verdict]:
    """The verbs some items could take but others refuse (a plan partly failed over:
    commit waits for every item), to say why their forms are not shown."""
    if any(j["state"] in ACTIVE for j in jobs):
        return []
    return [verdicts[v] for v in VERBS if v in verdicts and verdicts[v].run
            and verdicts[v].refused]


def by_state(machines: Sequence[str], items: Mapping[str, dict[str, Any]]
             ) -> list[tuple[str, list[str]]]:
    """The machines by their items' states, in the order the states first appear
    ("not replicated" for an item gone)."""
    out: dict[str, list[str]] = {}
    for m in machines:
        item = items.get(m)
        out.setdefault(str(item["state"]) if item else "not replicated", []).append(m)
    return list(out.items())


def waiting(jobs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The job waiting for an operator's confirmation, with ``action``: the step (its
    manual action) it waits at."""
    for job in jobs:
        if job["state"] == "waiting":
            step = next((s for s in job.get("steps") or [] if s["state"] == "running"), None)
            if step is not None:
                return {**job, "action": step}
    return None


class RecoveryReader:
    """Plans and groups as one request's page shows them."""

    def __init__(self, reader: Reader, services: Services) -> None:
        self.reader, self.services = reader, services

    async def items(self) -> dict[str, dict[str, Any]]:
        """Every replicated item's document, by machine."""
        return {i["machine"]: i for i in await self.reader.items()}

    async def plans(self) -> list[dict[str, Any]]:
        return await plans.list_all(self.services)

    async def plan(self, name: str) -> dict[str, Any]:
        return await plans.get(self.services, name)

    async def groups(self) -> list[dict[str, Any]]:
        return await groups.list_all(self.services)

    async def group(self, name: str) -> dict[str, Any]:
        return await groups.get(self.services, name)

    async def verdicts(self, groups: list[dict[str, Any]], target: str
                       ) -> dict[str, Verdict]:
        """What each whole-plan verb would do with the items of ``groups`` now."""
        return await planops.verdicts(self.services, groups, target, VERBS)

    async def jobs(self, target: str) -> list[dict[str, Any]]:
        return await self.reader.jobs(target=target, limit=JOBS_SHOWN)

    async def group_points(self, name: str, limit: int = GROUP_POINTS_SHOWN
                           ) -> list[dict[str, Any]]:
        """The group's newest ``limit`` group points, newest first, each with its state
        (complete, pending, failed) and its members' points."""
        async with self.services.sessionmaker() as s:
            rows = (await s.execute(select(GroupPoint).where(GroupPoint.group_name == name)
                                    .order_by(GroupPoint.created.desc()).limit(limit))
                    ).scalars().all()
            return [await grouppoints.point_doc(s, r) for r in rows]
