"""A process-server failover moves a consistency group whole: the members of a group on a
dead process server all go to the same healthy one (the group's barrier is on one
process server), while the least-loaded choice goes on for everything else. Through the
real configuration server (SQLite and PostgreSQL) on its own clock, heartbeats posted as
process servers post them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from configserver import db
from configserver.pshealth import MOVED
from siterecovery.apiclient import ApiClient
from tests.csclock import Clock, clocked_configserver
from tests.sitehelpers import heartbeat, step, wait_job


async def test_a_failover_moves_a_group_whole(tmp_path: Path, catalog_url: str) -> None:
    clock = Clock()
    clock.now = t0 = 1_800_000_000.0
    async with clocked_configserver(tmp_path / "cs", catalog_url, clock,
                                    procserver_failover_seconds=900.0) as server, \
            ApiClient(server.url, server.admin_token) as api, \
            ApiClient(server.url, server.services.internal_token) as internal:
        for name in ("ps1", "ps2", "ps3"):
            await heartbeat(internal, name)
        machines = ("app01", "db01", "web01")
        for m in machines:
            await api.post("/api/v1/machines", {
                "name": m, "ip": "192.0.2.7", "os_type": "linux", "os_name": "debian",
                "os_version": "12", "disks": [{"name": "sda", "path": "/dev/sda"}],
                "process_server": "ps1"})
        async with server.services.sessionmaker() as s:  # protected items, as if enabled
            for m in machines:
                s.add(db.ReplicatedItem(machine=m, policy="default", state="protected",
                                        health="normal", health_errors=[],
                                        disk_progress={}, created=t0, updated=t0))
            await s.commit()
        await api.post("/api/v1/groups", {"name": "erp", "members": ["app01", "db01"]})

        clock.now = t0 + 901  # ps1 silent past procserver_failover_seconds
        for name in ("ps2", "ps3"):
            await heartbeat(internal, name)
        await api.post("/api/v1/alerts/evaluate")  # a change: the failover check looks

        async def moves() -> list[dict[str, Any]]:
            jobs: list[dict[str, Any]] = (await api.get("/api/v1/jobs",
                                                        kind="move_machine"))["jobs"]
            return jobs

        jobs: list[dict[str, Any]] = []
        async with server.changed:
            while len(jobs := await moves()) < 3:
                await server.changed.wait()
        assert sorted(j["target"] for j in jobs) == list(machines)
        chose = {}
        for job in jobs:
            doc = await wait_job(api, job["id"], lambda j: step(j, "choose")["state"]
                                 in ("succeeded", "failed"))
            assert step(doc, "choose")["state"] == "succeeded", doc
            chose[job["target"]] = step(doc, "choose")["message"]
        where = {m["name"]: m["process_server"] for m in
                 (await api.get("/api/v1/machines"))["machines"]}
        # the group went whole to one server, in one transaction
        assert where["app01"] == where["db01"] != "ps1" != where["web01"], where
        assert (await api.get("/api/v1/groups/erp"))["process_server"] == where["app01"]
        first, second = sorted(("app01", "db01"), key=lambda m: "with it" in chose[m])
        assert chose[second].endswith(f"; with it, the other members of its consistency "
                                      f"group 'erp': {first}"), chose
        assert "(not ps1 any more): nothing to move" in chose[first], chose
        assert "consistency group" not in chose["web01"], chose
        events = (await api.get("/api/v1/events", code=MOVED))["events"]
        assert sorted(e["target"] for e in events) == sorted(machines)
        follower = [e for e in events if "together with its consistency group 'erp'"
                    in e["message"]]
        assert len(follower) == 1 and follower[0]["target"] in ("app01", "db01")
