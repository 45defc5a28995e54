"""Invariants 1 and 9 with real processes: kill -9 loses nothing acknowledged."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mobility.agent import Agent
from tests.helpers import (
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


def _proc_toml(tmp: Path, pki: Pki, vault_url: str, key: Path) -> Path:
    cert, pkey = pki.server()
    return write_toml(tmp / "procserver.toml", {
        "data_dir": str(tmp / "procserver"), "vault_url": vault_url,
        "vault_key_file": str(key), "tls_cert": cert, "tls_key": pkey, "tls_ca": pki.ca_path,
        "listen_port": 0, "metrics_port": 0,
    })


async def test_kill9_after_ack_before_upload_then_resume(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    url, key = vault_at
    vault_dir = tmp_path / "vault"
    # Every pack upload hangs: the process server acknowledges (cache fsynced) but
    # cannot upload, so the kill lands exactly between ack and upload.
    ps, cfg, disk, agent = await _on_faulty_store(tmp_path, pki, vault_at, "hang=packs/",
                                                  64 << 20, seed=11)
    expected = {}
    try:
        for i in range(3):
            if i:
                mutate(disk, 0.05, seed=20 + i)
            r = await agent.replicate_once()
            expected[r.cycle] = sha256(disk)
    finally:
        agent.close()
    assert len(ps.events("cycle_acknowledged")) == 3
    vault = await open_vault(vault_dir, key)
    assert await vault.list_points() == []  # acknowledged, not yet uploaded
    await ps.kill9()
    assert not ps.events("point_uploaded")

    # Restart on the healthy store: the cache still holds every acknowledged cycle.
    ps2 = await _restarted(cfg, url)
    cache = tmp_path / "procserver" / "cache"
    try:
        await ps2.wait_events("point_uploaded", 3)
        # The cache drains once the points are whole: each cycle's folder goes right
        # after its point_uploaded line (a folder a stop or a kill leaves behind is taken
        # up by the next start), so it is looked at while the server runs.
        assert await _drained(cache, 30.0), _files(cache)
    finally:
        assert await ps2.stop() == 0
    points = await vault.list_points("web01")
    assert [p.cycle for p in points] == list(expected)
    for p in points:
        assert await restore_all(vault, p, tmp_path / "out") == {"sda": expected[p.cycle]}
    await vault.close()


def _files(folder: Path) -> list[str]:
    return [str(f) for f in folder.rglob("*") if f.is_file()]


async def _drained(folder: Path, bound: float) -> bool:
    """Whether ``folder`` holds no file within ``bound`` seconds (no event tells when a
    folder's removal, in a thread of the server, has ended: looked at every 50 ms)."""
    deadline = time.monotonic() + bound
    for _ in range(int(bound / 0.05) + 1):
        if not _files(folder) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return not _files(folder)


async def _on_faulty_store(tmp: Path, pki: Pki, vault_at: tuple[str, Path], fault: str,
                           size: int, seed: int) -> tuple[Daemon, Path, Path, Agent]:
    """A process-server daemon on the vault behind the store fault ``fault`` (a query of
    vault/store/faults.py), and web01's agent on a disk of ``size`` bytes."""
    url, key = vault_at
    cfg = _proc_toml(tmp, pki, f"fault+{url}?{fault}", key)
    ps = Daemon(["procserver", "run", "--config", str(cfg)], "procserver_started")
    ready = await ps.start()
    disk = tmp / "disk.img"
    make_disk(disk, size, seed=seed)
    agent = make_agent(agent_config(tmp, pki, "web01", int(str(ready["port"])),
                                    {"sda": disk}))
    return ps, cfg, disk, agent


async def _restarted(cfg: Path, url: str) -> Daemon:
    """The process server started again on the same data, its vault without faults."""
    write_toml(cfg, {**_read(cfg), "vault_url": url})
    ps = Daemon(["procserver", "run", "--config", str(cfg)], "procserver_started")
    await ps.start()
    # Started: its start-up objects left full collections (common/gcsettle.py).
    [settled] = await ps.wait_events("startup_heap_settled", 1, timeout=60)
    assert int(str(settled["frozen_objects"])) > 50_000
    return ps


def _read(path: Path) -> dict[str, object]:
    import tomllib

    return dict(tomllib.loads(path.read_text()))


async def test_a_point_recorded_uploaded_but_not_logged_is_logged_at_the_next_start(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """The process dies right after it recorded a point uploaded, before its
    ``point_uploaded`` line (the store's fault: exit 137 at the cycle's lease deletion, the
    first thing after the record). The next start logs the line (``recovered``), so log
    watchers miss no point, and the point restores byte-exact."""
    url, key = vault_at
    ps, cfg, disk, agent = await _on_faulty_store(tmp_path, pki, vault_at,
                                                  "crash_delete=leases/", 16 << 20, seed=12)
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    assert ps.proc is not None
    assert await ps.proc.wait() == 137  # died at the lease deletion
    assert ps._drain is not None
    await ps._drain
    assert ps.events("cycle_acknowledged") and not ps.events("point_uploaded")
    vault = await open_vault(tmp_path / "vault", key)
    try:
        (point,) = await vault.list_points("web01")  # recorded: it is in the vault
        assert point.cycle == r.cycle

        ps2 = await _restarted(cfg, url)
        try:
            (logged,) = await ps2.wait_events("point_uploaded", 1)
        finally:
            assert await ps2.stop() == 0
        assert logged["cycle"] == r.cycle and logged["point"] == point.id
        assert logged["recovered"] is True
        assert await restore_all(vault, point, tmp_path / "out") == {"sda": sha256(disk)}
        assert not any(f.is_file() for f in (tmp_path / "procserver" / "cache").rglob("*"))
    finally:
        await vault.close()
