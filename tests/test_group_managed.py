"""A consistency group through the control plane, every part real: a configuration server,
a process server registered with it, two machines enrolled with the passphrase and
replicating, each with its managed agent. The agents learn their group from their
settings; when the group's interval begins they take their cycle through the process
server's barrier, and the process server reports the group point, which the catalog lists
as complete once both members' points are in it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from configserver.server import ConfigServer
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.siteclient import SiteClient
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests.helpers import make_disk, make_vault
from tests.managedsite import (
    _registered,
    enroll_machine,
    issue_procserver_cert,
    procserver_config,
)

MEMBERS = ("app01", "db01")
INTERVAL = 600


async def _agent(cs: ConfigServer, api: ApiClient, tmp: Path, m: str) -> MobilityConfig:
    disk = tmp / f"{m}.img"
    make_disk(disk, 4 << 20, seed=len(m))
    cfg = await enroll_machine(api, cs.site_url, str(cs.ca.cert_path), cs.passphrase, m,
                               disk, tmp / f"agent-{m}")
    await api.post("/api/v1/replication/enable", {"machine": m})
    return cfg


@contextlib.asynccontextmanager
async def _site(cs: ConfigServer, api: ApiClient, tmp_path: Path,
                wall: list[float]) -> AsyncIterator[tuple[ProcServer, list[ManagedAgent]]]:
    """A process server ps1 registered with ``cs``, both members enrolled and replicating
    through it in group ``erp``, their managed agents on the wall clock ``wall``."""
    url, key = await make_vault(tmp_path)
    await issue_procserver_cert(api, tmp_path / "ps-tls")
    ps = ProcServer(procserver_config(tmp_path, url, key, cs.ca.cert_path, cs.site_url,
                                      cs.cfg.internal_token_path))
    await ps.start()
    managed: list[ManagedAgent] = []
    clients: list[SiteClient] = []
    try:
        await _registered(cs, api)
        cfgs = [await _agent(cs, api, tmp_path, m) for m in MEMBERS]
        await api.post("/api/v1/groups", {"name": "erp", "members": list(MEMBERS),
                                          "interval_seconds": INTERVAL,
                                          "barrier_timeout_seconds": 60})
        for cfg in cfgs:
            client = SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
            await client.__aenter__()
            clients.append(client)
            managed.append(ManagedAgent(cfg, client, wall=lambda: wall[0]))
        yield ps, managed
    finally:
        for a in managed:
            a.close()
        for c in clients:
            await c.__aexit__(None, None, None)
        await ps.stop()


async def _group_points(cs: ConfigServer, api: ApiClient, state: str) -> list[dict[str, Any]]:
    """The group's points once the first is ``state`` (woken by the catalog's changes)."""
    async with asyncio.timeout(120), cs.changed:
        while True:
            pts = (await api.get("/api/v1/groups/erp/points"))["points"]
            if pts and pts[0]["state"] == state:
                return list(pts)
            await cs.changed.wait()


async def test_managed_members_meet_at_the_barrier_when_the_interval_begins(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    wall = [INTERVAL * 3_000_000 + 17.0]  # the agents' wall clock, moved by the test
    async with _site(cs, api, tmp_path, wall) as (ps, managed):
        # the interval the daemons start in: ordinary cycles (the initial copies)
        assert all(await asyncio.gather(*(a.round() for a in managed)))
        for a in managed:
            assert a.settings is not None and a.settings.group is not None
            assert a.settings.group["members"] == list(MEMBERS)
            assert a.agent.last_group is None
        # the next interval begins: both members' cycles go through the barrier
        wall[0] += INTERVAL
        assert all(await asyncio.gather(*(a.round() for a in managed)))
        cycles, point = {}, None
        for m, a in zip(MEMBERS, managed, strict=True):
            got = a.agent.last_group
            assert got is not None and got.released, got
            assert a.last is not None and got.cycle == a.last.cycle
            cycles[m], point = got.cycle, got.point
        # a round later in the same interval takes no group point
        assert all(await asyncio.gather(*(a.round() for a in managed)))
        assert all(a.last is not None and a.last.cycle not in cycles.values()
                   for a in managed)
        assert list(ps.barriers.outcomes) == [point]

        [gp] = await _group_points(cs, api, "complete")
        assert gp["id"] == point
        assert {m["machine"]: m["cycle"] for m in gp["members"]} == cycles
        assert all(m["point"] for m in gp["members"])


async def test_a_member_whose_cycle_is_abandoned_after_the_release_fails_the_group_point(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    """db01's agent dies the moment the barrier releases both members (its cycle is open
    on the process server, none of its blocks sent); app01's point of the group point
    comes in. When db01's agent runs again its next cycle supersedes the abandoned one,
    which the process server aborts: the group point ends failed, with an event naming
    db01 and its cycle."""
    wall = [INTERVAL * 3_000_000 + 17.0]
    async with _site(cs, api, tmp_path, wall) as (ps, managed):
        assert all(await asyncio.gather(*(a.round() for a in managed)))
        wall[0] += INTERVAL
        rounds = {m: asyncio.create_task(a.round()) for m, a in zip(MEMBERS, managed,
                                                                    strict=True)}
        report = ps.barriers.report
        assert report is not None

        def cut(doc: dict[str, Any]) -> None:  # at the release, in the server's own loop
            if doc["state"] == "released":
                rounds["db01"].cancel()
            report(doc)

        ps.barriers.report = cut
        assert await rounds["app01"]
        with pytest.raises(asyncio.CancelledError):
            await rounds["db01"]
        ps.barriers.report = report
        [outcome] = ps.barriers.outcomes.values()
        assert outcome["state"] == "released"
        cycles = outcome["members"]
        [gp] = await _group_points(cs, api, "pending")  # app01's point alone cannot end it
        assert await managed[1].round()  # db01 back: an ordinary cycle, its own point
        assert managed[1].last is not None and managed[1].last.cycle != cycles["db01"]
        [gp] = await _group_points(cs, api, "failed")
        assert gp["id"] == outcome["id"]
        # the process server says so when the new cycle supersedes the abandoned one (the
        # catalog's own settling would, once the new cycle's point is in)
        assert f"db01's cycle {cycles['db01']} of this group point" in gp["error"], gp
        assert "after the barrier released it" in gp["error"], gp
        got = {m["machine"]: m for m in gp["members"]}
        assert got["app01"]["point"] is not None and got["db01"]["point"] is None
        events = (await api.get("/api/v1/events"))["events"]
        [event] = [e for e in events if e["code"] == "group_point_failed"]
        assert event["target"] == "group:erp" and "db01" in event["message"]
        # the next group point of the same members goes through again
        wall[0] += INTERVAL
        assert all(await asyncio.gather(*(a.round() for a in managed)))
        assert len(ps.barriers.outcomes) == 2
