"""kill -9 of the configuration server during a re-protect of a running libvirt domain,
every part real (``tests/failbacksite.py``: ``configserver run`` with the libvirt target,
a process server, the original machine's managed agent; the failover boots the
recovered machine under a real libvirtd, and its guest writes a file, then idles).

- **Read paused** (``--pause``): the server is killed while the step, the domain paused,
  waits for the vault (held by the test). The domain stays paused while no server runs;
  the restarted server's resumed step reads it and resumes it: the point is a delta of
  exactly the blocks the guest wrote, and it restores to the image as it was read.
- **Copied live** (``--live``): killed at the same moment, the domain's disks copied by
  a libvirt backup and not yet read. The copy outlives the server; the resumed step
  makes it again, reads it and removes it; the domain was never paused.

One boot (the failover's)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import libvirtfixtures
from tests.failbacksite import KillSite, failed_over_site
from tests.helpers import open_vault
from tests.libvirtd import isolated_network
from tests.sitehelpers import step, wait_job
from tests.test_failback_kill9 import _restores_to
from tests.test_failback_libvirt import (
    BOUND,
    MARKER,
    _differing,
    _files,
    _guest_disk,
    _virsh,
)
from vault.locks import Lock, try_acquire

pytestmark = pytest.mark.root
uri, images = libvirtfixtures.uri, libvirtfixtures.images  # the shared fixtures
VM = "srk9-web01"
NET, BRIDGE, SUBNET = "srk9-net", "virbr-srk9", "10.222.0.0/24"  # not another test's
DRILL_SUBNET = "10.223.0.0/24"


@pytest.fixture(scope="module")
def net(uri: str) -> Iterator[str]:
    with isolated_network(uri, NET, BRIDGE, SUBNET) as name:
        yield name


@pytest.fixture
def catalog_url(tmp_path: Path) -> str:
    """SQLite: the catalogs' resumed jobs are covered by tests/test_failback_kill9.py."""
    return f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"


def _state(uri: str) -> str:
    return _virsh(uri, "domstate", VM).stdout.strip()


async def _killed_while_waiting_for_the_vault(site: KillSite, body: dict[str, object]
                                              ) -> tuple[str, Lock]:
    """Start a re-protect with ``body`` while the vault is held, kill -9 the server once
    its step waits for it, start the server again: the job's id and the held lock."""
    vault = await open_vault(site.tmp / "vault", site.key)
    try:
        got = await try_acquire(vault, "exclusive", "test: a prune")
        assert isinstance(got, Lock)
        seen = len(site.cs.events("vault_locked_waiting"))
        async with site.api() as api:
            jid = str((await api.post("/api/v1/items/web01/reprotect", body))["job"]["id"])
            await site.cs.wait_events("vault_locked_waiting", seen + 1, timeout=BOUND)
            assert step(await api.get(f"/api/v1/jobs/{jid}"), "take")["state"] == "running"
        return jid, got
    finally:
        await vault.close()


async def test_kill9_during_paused_and_live_reprotect_of_a_running_domain(
        uri: str, net: str, images: Path, tmp_path: Path, catalog_url: str) -> None:
    _virsh(uri, "destroy", VM)  # left by a killed run
    _virsh(uri, "undefine", VM)
    try:
        async with failed_over_site(
                tmp_path, catalog_url, make_disk=_guest_disk,
                configserver={"libvirt_uri": uri, "libvirt_image_dir": str(images),
                              "libvirt_network": net, "libvirt_drill_subnet": DRILL_SUBNET},
                recovery={"target": "libvirt", "vm_name": VM, "memory_mib": 256,
                          "boot_marker": MARKER},
                recovered=lambda _data: images / VM / "00-sda.raw",
                failover_timeout=BOUND) as site:
            async with site.api() as api:
                bs = (await api.get("/api/v1/policies/default"))["block_size"]
                failover_point = (await api.get("/api/v1/items/web01"))["failover"]["point"]
            console = (images / VM / "console.log").read_text(errors="replace")
            assert list(_files(console)["wrote"]) == ["orders-1.db"]  # it booted and wrote
            assert _state(uri) == "running"

            # read paused: killed with the domain paused, which stays so until the
            # restarted server's resumed step has read it
            jid, held = await _killed_while_waiting_for_the_vault(site, {"pause": True})
            try:
                assert _state(uri) == "paused"
                await site.cs.kill9()
                assert _state(uri) == "paused"
                read = site.recovered.read_bytes()  # paused: what the resumed step reads
                await site.start_cs()
                (resumed,) = await site.cs.wait_events("job_resumed", 1)
                assert (resumed["job"], resumed["attempts"]) == (jid, 2)
                assert _state(uri) == "paused"
            finally:
                await held.release()
            async with site.api() as api:
                done = await wait_job(api, jid, timeout=BOUND)
                assert done["state"] == "succeeded" and done["attempts"] == 2, done
                assert step(done, "take")["attempts"] == 2
                changed = _differing(site.disk.read_bytes(), read, bs)  # the guest's writes
                assert changed > 0
                take = step(done, "take")["message"]
                assert (f"{changed} block(s) stored as a delta on point {failover_point}; "
                        "read paused (") in take, take
                rp = (await api.get("/api/v1/items/web01"))["failover"]["reprotect"]
                assert (rp["points"], rp["last_blocks_stored"], rp["pausing"]) == (
                    1, changed, None)
            assert _state(uri) == "running"  # resumed by the server that did not pause it
            await _restores_to(site, rp["last_point"], hashlib.sha256(read).hexdigest(),
                               "out-paused")

            # copied live: killed with the copy made and not yet read; it outlives the
            # server and is made again; the domain is never paused
            events = await asyncio.create_subprocess_exec(
                "virsh", "-c", uri, "event", "--domain", VM, "--event", "lifecycle",
                "--loop", stdout=asyncio.subprocess.PIPE)
            try:
                jid, held = await _killed_while_waiting_for_the_vault(site, {"live": True})
                try:
                    copy = images / VM / "live-copy"
                    assert copy.is_dir() and any(copy.iterdir())
                    await site.cs.kill9()
                    assert copy.is_dir() and _state(uri) == "running"
                    await site.start_cs()
                    (resumed,) = await site.cs.wait_events("job_resumed", 1)
                    assert (resumed["job"], resumed["attempts"]) == (jid, 2)
                finally:
                    await held.release()
                async with site.api() as api:
                    done = await wait_job(api, jid, timeout=BOUND)
            finally:
                events.terminate()
                out, _ = await asyncio.wait_for(events.communicate(), 30)
            seen = out.decode(errors="replace")
            assert done["state"] == "succeeded" and done["attempts"] == 2, done
            assert "Suspended" not in seen and "Resumed" not in seen, seen
            assert _state(uri) == "running" and not copy.exists()
            now = site.recovered.read_bytes()  # the guest idles: what the copy held
            take = step(done, "take")["message"]
            assert (f"{_differing(read, now, bs)} block(s) stored as a delta on point "
                    f"{rp['last_point']}; copied while it ran (") in take, take
            async with site.api() as api:
                rp = (await api.get("/api/v1/items/web01"))["failover"]["reprotect"]
            assert (rp["points"], rp["last_live"]) == (2, True)
            await _restores_to(site, rp["last_point"], hashlib.sha256(now).hexdigest(), "out-live")
    finally:
        _virsh(uri, "destroy", VM)
        _virsh(uri, "undefine", VM)
