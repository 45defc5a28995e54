"""Multi-VM consistency: two real agents, each with ext4 on a loop device frozen with
fsfreeze, replicating through one real process server into a local vault, while one
application writes linked records across both (each record on disk A names a record on
disk B, written after it). At every group point the process server's barrier holds both
members frozen at one moment; every group point's pair of restored images is parsed
record by record and has no dangling link. A member that never arrives fails the group
point (and the member that did still makes its own point); so does a member whose
snapshot cannot hold its writes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mobility.agent import Agent
from mobility.groupcycle import GroupCall, group_point_id
from mobility.snapshot import NoSnapshot
from procserver.barrier import Barriers
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import Pki, agent_config, make_agent, open_vault
from tests.test_ext4 import loop_device, mounted
from vault.materialize import materialize
from wire.protocol import ProtocolError

IMAGE = 48 << 20
RECORD = 24  # b"A0000000001>B0000000001\n", b"B0000000001:...........\n"
GROUP_POINTS = 3


def _need_root_tools() -> None:
    if os.geteuid() != 0:
        missing_backend("root (loop devices, mount, fsfreeze)", "run the suite as root")
    for tool in ("losetup", "mkfs.ext4", "debugfs", "mount", "umount"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs e2fsprogs and util-linux")


def _mkfs(image: Path) -> None:
    with open(image, "wb") as f:
        f.truncate(IMAGE)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    str(image)], check=True, capture_output=True)


class LinkedWriter:
    """The application: record n on B, then record n on A naming B's record n — never a
    link before its target. Each write is a plain append (no fsync: a freeze flushes)."""

    def __init__(self, a: Path, b: Path) -> None:
        self.fa = os.open(a / "records", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.fb = os.open(b / "records", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.n = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopping.is_set() and self.n < 200_000:
                n = self.n + 1
                os.write(self.fb, b"B%010d:%s\n" % (n, b"." * 11))
                os.write(self.fa, b"A%010d>B%010d\n" % (n, n))
                self.n = n
                self.stopping.wait(0.0005)  # the application's own pace
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        os.close(self.fa)
        os.close(self.fb)
        if self.error is not None:
            raise self.error


def _group_points(ps: ProcServer) -> dict[str, float]:
    """The process server's group point counter, by outcome, as Prometheus reads it."""
    text = generate_latest(ps.metrics.registry).decode()
    return {s.labels["state"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "siterecovery_procserver_group_points_total"}


def _records(image: Path, kind: bytes) -> list[bytes]:
    """The records file of a restored ext4 image, read by debugfs (nothing mounted),
    split into whole records."""
    out = subprocess.run(["debugfs", "-R", "cat /records", str(image)], check=True,
                         capture_output=True).stdout
    assert len(out) % RECORD == 0, f"a torn record in {image.name} ({len(out)} bytes)"
    recs = [out[i:i + RECORD] for i in range(0, len(out), RECORD)]
    for i, r in enumerate(recs, 1):
        assert r[:1] == kind and int(r[1:11]) == i and r.endswith(b"\n"), (image.name, i, r)
    return recs


@pytest.mark.root
async def test_every_group_point_restores_with_no_dangling_link(
        tmp_path: Path, pki: Pki, procserver: ProcServer,
        vault_at: tuple[str, Path]) -> None:
    _need_root_tools()
    images = {m: tmp_path / f"{m}.img" for m in ("app01", "db01")}
    for image in images.values():
        _mkfs(image)
    members = ("app01", "db01")
    taken: list[tuple[str, dict[str, str]]] = []  # group point, machine -> cycle
    with loop_device(images["app01"]) as dev_a, loop_device(images["db01"]) as dev_b, \
            mounted(dev_a, tmp_path / "mnt-a") as mnt_a, \
            mounted(dev_b, tmp_path / "mnt-b") as mnt_b:
        agents = {m: Agent(agent_config(tmp_path, pki, m, procserver.port, {"sda": Path(dev)},
                                        snapshot="fsfreeze", freeze_mounts=[str(mnt)]))
                  for m, dev, mnt in (("app01", dev_a, mnt_a), ("db01", dev_b, mnt_b))}
        writer = LinkedWriter(mnt_a, mnt_b)
        try:
            for slot in range(GROUP_POINTS):
                call = GroupCall(group_point_id("erp", slot), "erp", members, 60.0)
                for agent in agents.values():
                    agent.group_call = call
                results = await asyncio.gather(*(a.replicate_once() for a in agents.values()))
                cycles = {m: r.cycle for m, r in zip(agents, results, strict=True)}
                for m, agent in agents.items():
                    got = agent.last_group
                    assert got is not None and got.released, (m, got)
                    assert (got.point, got.cycle) == (call.point, cycles[m])
                outcome = procserver.barriers.outcomes[call.point]
                assert (outcome["state"], outcome["members"]) == ("released", cycles)
                taken.append((call.point, cycles))
                assert _group_points(procserver) == {"released": float(slot + 1)}
                assert all(r.consistency == "crash" for r in results)
        finally:
            writer.stop()
            for agent in agents.values():
                agent.close()
    assert writer.n > 0
    points = {cycle: await procserver.wait_point(cycle)  # whole in the vault, every one
              for _, cycles in taken for cycle in cycles.values()}
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    index = await vault.load_index()
    counts = []
    try:
        for gp, cycles in taken:
            recs: dict[str, list[bytes]] = {}
            for m, cycle in cycles.items():
                point = await vault.read_point(points[cycle])
                out = tmp_path / f"restored-{gp[:8]}-{m}.img"
                await materialize(vault, point, "sda", str(out), index=index)
                recs[m] = _records(out, b"A" if m == "app01" else b"B")
                out.unlink()
            links = [int(r[13:23]) for r in recs["app01"]]
            dangling = [n for n in links if n > len(recs["db01"])]
            assert not dangling, f"group point {gp}: A names {len(dangling)} records B " \
                                 f"does not hold (B has {len(recs['db01'])})"
            counts.append(len(recs["app01"]))
    finally:
        await vault.close()
    # the application kept writing between the group points: each holds more records
    assert counts == sorted(counts) and counts[-1] > 0, counts


async def test_a_member_that_never_arrives_fails_the_group_point(
        tmp_path: Path, pki: Pki, procserver: ProcServer) -> None:
    disk = tmp_path / "web01.img"
    disk.write_bytes(os.urandom(1 << 20))
    agent = make_agent(agent_config(tmp_path, pki, "web01", procserver.port, {"sda": disk}))
    call = GroupCall(group_point_id("shop", 7), "shop", ("web01", "db02"), 2.0)
    agent.group_call = call
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    got = agent.last_group
    assert got is not None and not got.released
    assert got.error is not None and "db02 did not reach the barrier (ready)" in got.error
    outcome = procserver.barriers.outcomes[call.point]
    assert outcome["state"] == "failed" and "db02" in outcome["error"]
    assert outcome["members"] == {"db02": None, "web01": None}
    await procserver.wait_point(r.cycle)  # the member's own point is made all the same
    assert _group_points(procserver) == {"failed": 1.0}


async def test_a_member_whose_snapshot_cannot_hold_its_writes_fails_the_group_point(
        tmp_path: Path, pki: Pki, procserver: ProcServer) -> None:
    agents = []
    for m in ("web01", "db02"):
        disk = tmp_path / f"{m}.img"
        disk.write_bytes(os.urandom(1 << 20))
        cfg = agent_config(tmp_path, pki, m, procserver.port, {"sda": disk})
        agents.append(make_agent(cfg) if m == "web01" else Agent(cfg, provider=NoSnapshot()))
    call = GroupCall(group_point_id("shop", 8), "shop", ("web01", "db02"), 30.0)
    try:
        for a in agents:
            a.group_call = call
        results = await asyncio.gather(*(a.replicate_once() for a in agents))
    finally:
        for a in agents:
            a.close()
    outcome = procserver.barriers.outcomes[call.point]
    assert outcome["state"] == "failed"
    assert "db02's snapshot cannot hold its writes" in outcome["error"]
    for a, r in zip(agents, results, strict=True):
        assert a.last_group is not None and not a.last_group.released
        await procserver.wait_point(r.cycle)


@pytest.mark.parametrize("doc", [
    {"point": "zz", "group": "g", "members": ["web01"], "timeout_seconds": 5,
     "phase": "ready"},
    {"point": "ab" * 16, "group": "g", "members": ["other"], "timeout_seconds": 5,
     "phase": "ready"},
    {"point": "ab" * 16, "group": "g", "members": ["web01"], "timeout_seconds": 0,
     "phase": "ready"},
    {"point": "ab" * 16, "group": "g", "members": ["web01"], "timeout_seconds": 5,
     "phase": "thawed"},
    {"point": "ab" * 16, "group": "g", "members": ["web01"], "timeout_seconds": 5,
     "phase": "frozen"},
])
async def test_a_malformed_barrier_is_refused(doc: dict[str, object]) -> None:
    barriers = Barriers()
    with pytest.raises(ProtocolError) as e:
        await barriers.arrive("web01", doc)
    assert e.value.code == "bad_barrier"
    assert not barriers.outcomes
