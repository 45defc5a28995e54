"""Failback onto the original machine's disks, by its own agent (mobility/inplace.py,
procserver/fetch.py): only the blocks that differ from the chosen point are fetched and
written, each checked, the disk digest verified; then the point is the agent's base, so
the next cycle is a delta on it (no initial copy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mobility.inplace import FailbackError, failback, failback_pending
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import (
    BLOCK,
    Pki,
    agent_config,
    make_agent,
    make_disk,
    mutate,
    point_restores_to,
    run_cli,
    sha256,
    write_toml,
)
from wire.protocol import MAX_FETCH, FrameType, encode_json

SIZE = 16 << 20
SHORT = (1 << 20) + 4321  # a short last block


def _chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True)


def _differing(a: bytes, b: bytes, bs: int = BLOCK) -> int:
    return sum(a[o:o + bs] != b[o:o + bs] for o in range(0, max(len(a), len(b)), bs))


async def test_failback_writes_only_what_differs_and_the_next_cycle_is_a_delta(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path]) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_disk(a, SIZE, seed=11)
    make_disk(b, SHORT, seed=12)
    disks = {"sda": a, "sdb": b}
    cfg = agent_config(tmp_path, pki, "web01", procserver.port, disks)
    agent = make_agent(cfg)
    try:
        r1 = await agent.replicate_once()
        p1 = await procserver.wait_point(r1.cycle, timeout=60)
        at_p1 = {n: p.read_bytes() for n, p in disks.items()}
        # After the point the disks moved on (replicated, then written and not), and one
        # was cut short: the failback must bring back the point exactly.
        mutate(a, 0.04, seed=13)
        r2 = await agent.replicate_once()
        await procserver.wait_point(r2.cycle, timeout=60)
        mutate(a, 0.03, seed=14, zero_share=0.5)
        with open(b, "r+b") as f:
            f.truncate(SHORT - 1000)
        expected = {n: _differing(at_p1[n], p.read_bytes().ljust(len(at_p1[n]), b"\0"))
                    for n, p in disks.items()}
        assert expected["sda"] > 0 and expected["sdb"] == 1

        seen: list[tuple[str, str, int, int]] = []
        r = await failback(agent, p1, lambda *a: seen.append(a))
        assert r.point == p1 and r.cycle == r1.cycle
        assert {d.disk: d.blocks_written for d in r.disks} == expected
        assert r.bytes_written == expected["sda"] * BLOCK + SHORT % BLOCK
        assert {d.disk: d.blocks_compared for d in r.disks} == {
            "sda": SIZE // BLOCK, "sdb": -(-SHORT // BLOCK)}
        for n, p in disks.items():
            assert p.read_bytes() == at_p1[n], n
        assert ("sda", "write", r.disks[0].bytes_written, r.disks[0].bytes_written) in seen

        # Re-protect in the original direction: a delta on the point, nothing to send.
        r3 = await agent.replicate_once()
        assert (r3.kind, r3.full, r3.blocks_sent) == ("delta", False, 0)
        mutate(a, 0.01, seed=15)
        r4 = await agent.replicate_once()
        assert r4.kind == "delta" and 0 < r4.bytes_sent <= 0.02 * SIZE
        await point_restores_to(procserver, tmp_path, vault_at[1], r4.cycle,
                                {n: sha256(p) for n, p in disks.items()})
    finally:
        agent.close()


async def test_failback_by_the_cli_and_what_it_refuses(
        tmp_path: Path, pki: Pki, procserver: ProcServer) -> None:
    disk = tmp_path / "d.img"
    make_disk(disk, 4 << 20, seed=21)
    cfg = agent_config(tmp_path, pki, "db01", procserver.port, {"sda": disk},
                       snapshot="quiesced")
    agent = make_agent(cfg)
    try:
        r1 = await agent.replicate_once()
        p1 = await procserver.wait_point(r1.cycle, timeout=60)
        original = disk.read_bytes()
        # A point of another machine, or none at all: refused, nothing written.
        mutate(disk, 0.1, seed=22)
        damaged = disk.read_bytes()
        with pytest.raises(FailbackError, match="no point"):
            await failback(agent, "0" * 64)
        assert disk.read_bytes() == damaged
    finally:
        agent.close()
    toml = write_toml(tmp_path / "mobility.toml",
                      {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    res = await asyncio.to_thread(run_cli, "mobility", "failback", "--config", str(toml),
                                  "--point", p1, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["point"] == p1
    assert out["blocks_written"] == _differing(original, damaged) > 0
    assert disk.read_bytes() == original



async def test_fetch_serves_the_point_and_refuses_what_it_cannot(
        tmp_path: Path, pki: Pki, procserver: ProcServer) -> None:
    disk = tmp_path / "d.img"
    make_disk(disk, 1 << 20, seed=31)
    agent = make_agent(agent_config(tmp_path, pki, "app01", procserver.port, {"sda": disk}))
    try:
        r1 = await agent.replicate_once()
        p1 = await procserver.wait_point(r1.cycle, timeout=60)
        link = await agent._connect_retrying()
        try:
            # Another machine's point, or none: refused, and the session goes on.
            link.send(encode_json(FrameType.FETCH, {"point": "0" * 64, "disk": "sda",
                                                    "blocks": [0]}))
            err = await link.recv(30)
            assert err.type == FrameType.ERROR and err.json()["code"] == "no_point"
            link.send(encode_json(FrameType.FETCH, {"point": p1, "disk": "sda",
                                                    "blocks": [3, 0]}))
            got = [(await link.recv(30)).block() for _ in range(2)]
            assert [(n, bytes(d)) for _, n, d in got] == [
                (n, disk.read_bytes()[n * BLOCK:(n + 1) * BLOCK]) for n in (3, 0)]
            end = await link.recv(30)
            assert end.type == FrameType.FETCH and end.json()["blocks"] == 2
        finally:
            await link.close()
        for bad in ({"point": p1, "disk": "sda", "blocks": []},
                    {"point": p1, "disk": "sda", "blocks": [-1]},
                    {"point": p1, "disk": "sda", "blocks": [True]},
                    {"point": p1, "disk": "sda", "blocks": list(range(MAX_FETCH + 1))},
                    {"point": p1, "disk": "sda", "blocks": [16]},  # past the disk
                    {"point": p1, "blocks": [0]}):
            link = await agent._connect_retrying()
            try:
                link.send(encode_json(FrameType.FETCH, bad))
                err = await link.recv(30)
                assert err.type == FrameType.ERROR and err.json()["code"] == "bad_fetch", bad
            finally:
                await link.close()
    finally:
        agent.close()


async def test_an_interrupted_failback_holds_replication_and_finishes_when_run_again(
        tmp_path: Path, pki: Pki, procserver: ProcServer) -> None:
    """The second disk cannot be opened for writing (immutable) after the first was
    written: the agent's state stays the old one, the disks are marked as being written
    (the managed agent does not replicate them), and the failback run again writes only
    what still differs, its counts the whole failback's."""
    if shutil.which("chattr") is None or os.geteuid() != 0:
        missing_backend("chattr as root", "tests/run.sh installs e2fsprogs; run as root")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_disk(a, 2 << 20, seed=41)
    make_disk(b, 2 << 20, seed=42)
    cfg = agent_config(tmp_path, pki, "file01", procserver.port, {"sda": a, "sdb": b})
    agent = make_agent(cfg)
    try:
        r1 = await agent.replicate_once()
        p1 = await procserver.wait_point(r1.cycle, timeout=60)
        at_p1 = {"sda": a.read_bytes(), "sdb": b.read_bytes()}
        mutate(a, 0.2, seed=43)
        mutate(b, 0.2, seed=44)
        left_a = _differing(at_p1["sda"], a.read_bytes())
        left_b = _differing(at_p1["sdb"], b.read_bytes())
        state_before = (Path(cfg.state_dir) / "state.json").read_text()
        _chattr("+i", b)
        try:
            with pytest.raises(PermissionError):
                await failback(agent, p1)
        finally:
            _chattr("-i", b)
        assert a.read_bytes() == at_p1["sda"]  # written before the failure
        assert failback_pending(cfg.state_dir) == p1
        assert (Path(cfg.state_dir) / "state.json").read_text() == state_before

        r = await failback(agent, p1)
        # sda's blocks were written by the first run (counted, not written again)
        assert {d.disk: (d.blocks_written, d.blocks_written_before) for d in r.disks} == {
            "sda": (left_a, left_a), "sdb": (left_b, 0)}
        assert {"sda": a.read_bytes(), "sdb": b.read_bytes()} == at_p1
        assert failback_pending(cfg.state_dir) is None
        assert not list(Path(cfg.state_dir).glob("failback-plan.*"))
    finally:
        agent.close()
