"""The process server's cache filesystem runs out of space."""

from __future__ import annotations

import asyncio
from pathlib import Path

from procserver.server import ProcServer
from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    make_disk,
    proc_config,
    restore_all,
    sha256,
)
from vault.keyslots import KeyMaterial, read_keyfile
from vault.repo import Vault
from vault.store.open import open_store


async def test_cache_disk_full(tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """The cache's filesystem fills up (a 24 MiB tmpfs under a larger configured quota): the
    cycle in flight is refused, not acknowledged; the process server lives on, and once
    the agent retries with room it all lands."""
    import os
    import subprocess

    from tests.backends import missing_backend

    if os.geteuid() != 0:
        missing_backend("root (a small tmpfs for the cache)", "run the suite as root")
    url, key = vault_at
    cache_fs = tmp_path / "procserver"
    cache_fs.mkdir()
    await asyncio.to_thread(subprocess.run, ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs",
                                             str(cache_fs)], check=True)
    try:
        disk = tmp_path / "disk.img"
        make_disk(disk, 48 << 20, seed=43)
        cfg = proc_config(tmp_path, pki, url, key, cache_quota_bytes=1 << 30,
                          segment_bytes=4 << 20)
        ps = ProcServer(cfg)
        await ps.start()
        agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
        try:
            from wire.protocol import RemoteError

            try:
                await agent.replicate_once()
                refused = False
            except RemoteError as e:
                refused = True
                assert "space" in str(e).lower() or "full" in str(e).lower(), str(e)
            assert refused, "a 48 MiB initial copy cannot fit a 24 MiB cache unacknowledged"
            # The refused cycle's space is free before the agent hears of it: no file of it
            # is left open or mapped (only the database and its WAL stay on the disk).
            st = os.statvfs(cache_fs)
            assert st.f_bavail * st.f_frsize >= 22 << 20, \
                f"{st.f_bavail * st.f_frsize} bytes free after the refused cycle"
            small = tmp_path / "small.img"
            make_disk(small, 8 << 20, seed=44)
            other = make_agent(agent_config(tmp_path, pki, "web02", ps.port, {"sda": small}))
            try:
                r = await other.replicate_once()  # the server lives on and serves others
            finally:
                other.close()
            vault = await Vault.open(open_store(url), KeyMaterial(keyfile=read_keyfile(key)))
            try:
                await ps.wait_point(r.cycle)
                pts = await vault.list_points("web02")
                assert await restore_all(vault, pts[-1], tmp_path / "out") == {
                    "sda": sha256(small)}
                assert await vault.list_points("web01") == []
            finally:
                await vault.close()
        finally:
            agent.close()
            await ps.stop()
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(cache_fs)], check=False)
