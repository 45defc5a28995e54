"""Invariants 1 and 9 with real processes: kill -9 loses nothing acknowledged."""

from __future__ import annotations

from pathlib import Path

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
    cfg = _proc_toml(tmp_path, pki, f"fault+{url}?hang=packs/", key)
    ps = Daemon(["procserver", "run", "--config", str(cfg)], "procserver_started")
    ready = await ps.start()
    disk = tmp_path / "disk.img"
    make_disk(disk, 64 << 20, seed=11)
    agent = make_agent(agent_config(tmp_path, pki, "web01", int(str(ready["port"])),
                                    {"sda": disk}))
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
    write_toml(cfg, {**_read(cfg), "vault_url": url})
    ps2 = Daemon(["procserver", "run", "--config", str(cfg)], "procserver_started")
    await ps2.start()
    try:
        await ps2.wait_events("point_uploaded", 3)
    finally:
        assert await ps2.stop() == 0
    points = await vault.list_points("web01")
    assert [p.cycle for p in points] == list(expected)
    for p in points:
        assert await restore_all(vault, p, tmp_path / "out") == {"sda": expected[p.cycle]}
    # The cache was drained once the points were whole.
    assert not any(f.is_file() for f in (tmp_path / "procserver" / "cache").rglob("*"))
    await vault.close()


def _read(path: Path) -> dict[str, object]:
    import tomllib

    return dict(tomllib.loads(path.read_text()))
