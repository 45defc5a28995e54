"""kill -9 at many random moments, of the process server and of the agent.

Each run ends the same way: every listed recovery point restores to a state the
disk really had when a cycle was attempted, every acknowledged cycle is a point,
and after a clean final cycle the newest point is the disk as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import sys
from pathlib import Path

import pytest

from mobility.agent import Agent
from tests.helpers import (
    REPO,
    Daemon,
    Pki,
    agent_config,
    make_agent,
    make_disk,
    mutate,
    open_vault,
    restore_all,
    sha256,
    write_toml,
)
from wire.protocol import ProtocolError, RemoteError

ROUNDS = 8
SEED = int(os.environ.get("SITERECOVERY_TEST_SEED", "20261125"))


def _proc_toml(tmp: Path, pki: Pki, url: str, key: Path, port: int) -> Path:
    cert, pkey = pki.server()
    return write_toml(tmp / "procserver.toml", {
        "data_dir": str(tmp / "procserver"), "vault_url": url, "vault_key_file": str(key),
        "tls_cert": cert, "tls_key": pkey, "tls_ca": pki.ca_path, "listen_port": port,
        "metrics_port": 0})


async def _check(tmp: Path, key: Path, machine: str, attempted: set[str],
                 acked: dict[str, str], final: str) -> None:
    vault = await open_vault(tmp / "vault", key)
    try:
        points = await vault.list_points(machine)
        listed = {p.cycle for p in points}
        assert set(acked) <= listed, "an acknowledged cycle was lost"
        for p in points:
            got = (await restore_all(vault, p, tmp / "out"))["sda"]
            assert got in attempted, f"point {p.id} is no state the disk ever had"
            if p.cycle in acked:
                assert got == acked[p.cycle]
        assert got == final  # the newest point is the disk now
    finally:
        await vault.close()


@pytest.mark.slow
async def test_kill9_process_server_at_random_moments(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    rng = random.Random(SEED)
    url, key = vault_at
    from tests.backends import _free_port

    cfg = _proc_toml(tmp_path, pki, url, key, _free_port())
    disk = tmp_path / "disk.img"
    make_disk(disk, 32 << 20, seed=61)
    agent_cfg = agent_config(tmp_path, pki, "web01", 0, {"sda": disk})
    attempted: set[str] = set()
    acked: dict[str, str] = {}
    ps: Daemon | None = None
    for rnd in range(ROUNDS + 1):
        ps = Daemon(["procserver", "run", "--config", str(cfg)], "procserver_started")
        port = int(str((await ps.start())["port"]))
        agent = make_agent(dataclasses.replace(agent_cfg, server_port=port))

        async def replicate_forever(agent: Agent) -> None:
            while True:
                mutate(disk, rng.uniform(0.01, 0.2), seed=rng.randrange(1 << 30))
                state = sha256(disk)
                attempted.add(state)
                r = await agent.replicate_once()
                acked[r.cycle] = state

        if rnd == ROUNDS:  # the last round: no kill; one clean cycle, then drain
            r = await agent.replicate_once()
            acked[r.cycle] = final = sha256(disk)
            attempted.add(final)
            # Uploads are ordered per machine: once this one is a point, so is every
            # acknowledged cycle the cache held from before the kills.
            await _wait_for_point(ps, r.cycle)
            agent.close()
            assert await ps.stop() == 0
            break
        task = asyncio.create_task(replicate_forever(agent))
        try:
            await asyncio.sleep(rng.uniform(0.05, 1.5))  # the kill's moment (not a sync)
            await ps.kill9()
            with pytest.raises((OSError, ProtocolError, RemoteError, TimeoutError, EOFError,
                                asyncio.IncompleteReadError)):
                await task  # the agent notices: the cycle in flight fails
        finally:
            task.cancel()
            agent.close()
    await _check(tmp_path, key, "web01", attempted, acked, final)


async def _wait_for_point(ps: Daemon, cycle: str) -> None:
    n = 1
    while not any(e.get("cycle") == cycle for e in ps.events("point_uploaded")):
        await ps.wait_events("point_uploaded", n)
        n += 1


@pytest.mark.slow
async def test_kill9_agent_at_random_moments(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    from tests.helpers import proc_config, running_procserver

    rng = random.Random(SEED + 1)
    url, key = vault_at
    disk = tmp_path / "disk.img"
    make_disk(disk, 32 << 20, seed=62)
    attempted: set[str] = set()
    acked: dict[str, str] = {}
    async with running_procserver(proc_config(tmp_path, pki, url, key)) as ps:
        acfg = agent_config(tmp_path, pki, "db01", ps.port, {"sda": disk},
                            snapshot="quiesced")
        fields = {f.name: getattr(acfg, f.name) for f in dataclasses.fields(acfg)}
        cfg = write_toml(tmp_path / "mobility.toml", fields)
        final = ""
        for rnd in range(ROUNDS + 1):
            mutate(disk, rng.uniform(0.01, 0.2), seed=rng.randrange(1 << 30))
            state = sha256(disk)
            attempted.add(state)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "siterecovery", "mobility", "replicate", "--config",
                str(cfg), "--json", cwd=REPO, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
            if rnd < ROUNDS:
                try:
                    await asyncio.wait_for(proc.wait(), rng.uniform(0.05, 1.0))
                except TimeoutError:
                    # kill -9 at a random moment of the cycle (unless it ended just then)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            out, _ = await proc.communicate()
            if proc.returncode == 0:
                import json

                cycle = json.loads(out.decode().strip().splitlines()[-1])["cycle"]
                acked[cycle] = state
                final = state
            else:
                assert rnd < ROUNDS, out.decode()
        assert final == sha256(disk)
        for cycle in acked:
            await ps.wait_point(cycle)
    await _check(tmp_path, key, "db01", attempted, acked, final)
