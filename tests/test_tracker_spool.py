"""Short freezes: with fsfreeze and a tracker, a cycle's blocks are spooled while frozen.

ext4 on a loop device, mounted and written through, protected with ``snapshot =
"fsfreeze"`` and the block-layer tracker. The cycle is opened on the process server
(``cycle_opened``: its READY arrived) before the filesystem is frozen
(``cycle_frozen``), so the freeze holds no round trip. A cycle of 10 MB of changes
copies what it reads into the spool and thaws the filesystem *before* the first block
goes to the process server (the order of the agent's own events:
``filesystems_thawed`` before ``cycle_send_started``); a file written while that cycle
is sent is not in its point but in the next one (the tracker's cut came before it). A
cycle that reads more than the spool holds (the full copy, 20 MB of changes) is sent
frozen as without a spool, logged and counted. Every point is compared byte for byte
with the device as it was while frozen (read by the test from inside the hold) and
passes ``e2fsck -fn``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from mobility.agent import Agent, CycleResult
from mobility.config import MobilityConfig
from mobility.snapshot import FsFreeze
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import Pki, agent_config, open_vault
from tests.test_ext4 import loop_device, mounted
from tests.test_tracker_blocktrace import device_sha, tracefs  # noqa: F401 (a fixture)
from vault.materialize import materialize

pytestmark = pytest.mark.root
DEVICE = 64 << 20
SPOOL_MB = 16


def write_mb(mnt: Path, name: str, mb: int, seed: int) -> None:
    """``mb`` MB of new file data, through the filesystem (the freeze writes it back)."""
    rng = random.Random(seed)
    for i in range(mb):
        (mnt / f"{name}-{i}").write_bytes(rng.randbytes(1_000_000))


EVENTS = ("resync_required", "cycle_opened", "cycle_frozen", "filesystems_thawed",
          "cycle_send_started", "cycle_spooled", "freeze_spool_overflow")
SPOOLED = ["cycle_opened", "cycle_frozen", "filesystems_thawed", "cycle_spooled",
           "cycle_send_started"]


def events_of(logs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The agent's events that tell the order of BEGIN, freeze, thaw and send."""
    return [e["event"] if e["event"] != "freeze_spool_overflow" else
            f"freeze_spool_overflow ({e['log_level']})" for e in logs if e["event"] in EVENTS]


async def cycle(agent: Agent, dev: str, while_sent: Callable[[], None] | None = None
                ) -> tuple[CycleResult, str, list[str]]:
    """One cycle; the device's sha256 read inside the hold, and the agent's events.
    ``while_sent`` runs once the first blocks have gone to the process server."""
    frozen: list[str] = []

    def inside(kind: str) -> None:  # called while the hold lasts, before any block is read
        frozen.append(device_sha(dev))

    def sent(disk: str, done: int, size: int) -> None:
        nonlocal while_sent
        if while_sent is not None:
            while_sent()
            while_sent = None

    with structlog.testing.capture_logs() as logs:
        r = await agent.replicate_once(sent, on_kind=inside)
    return r, frozen[0], events_of(logs)


async def point_is(ps: ProcServer, tmp: Path, key: Path, cycle: str, want: str) -> None:
    """The point of ``cycle`` restores to exactly ``want`` and its ext4 checks clean."""
    vault = await open_vault(tmp / "vault", key)
    try:
        point = await vault.read_point(await ps.wait_point(cycle, timeout=60))
        out = tmp / f"restored-{cycle[:8]}.img"
        await materialize(vault, point, "sda", str(out), index=await vault.load_index())
    finally:
        await vault.close()
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == want
    fsck = await asyncio.create_subprocess_exec(
        "e2fsck", "-fn", str(out), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    report, _ = await fsck.communicate()
    assert fsck.returncode == 0, report.decode()
    out.unlink()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"siterecovery_agent_{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics file")


@pytest.fixture
def ext4_mounted(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An ext4 on a loop device, mounted: (the device, the mount point)."""
    for tool in ("mkfs.ext4", "e2fsck"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs e2fsprogs and util-linux")
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(DEVICE)
    with loop_device(image) as dev:
        subprocess.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        dev], check=True)
        with mounted(dev, tmp_path / "mnt") as mnt:
            yield dev, mnt


@pytest.mark.usefixtures("tracefs")
async def test_a_small_cycle_is_spooled_and_thawed_before_it_is_sent(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        ext4_mounted: tuple[str, Path]) -> None:
    key, (dev, mnt) = vault_at[1], ext4_mounted
    cfg = agent_config(tmp_path, pki, "vm01", procserver.port, {"sda": Path(dev)},
                       snapshot="fsfreeze", freeze_mounts=[str(mnt)],
                       tracker="blocktrace", freeze_spool_mb=SPOOL_MB,
                       metrics_file=str(tmp_path / "agent.prom"))
    cfg.validate()
    agent = Agent(cfg)
    assert isinstance(agent.provider, FsFreeze)
    try:
        # The full copy reads the whole 64 MiB device: more than the spool (expected).
        r, want, events = await cycle(agent, dev)
        assert (r.kind, r.spool_overflow, r.spooled_bytes) == ("full", True, 0)
        assert events == ["cycle_opened", "cycle_frozen", "freeze_spool_overflow (info)",
                          "cycle_send_started", "filesystems_thawed"]
        await point_is(procserver, tmp_path, key, r.cycle, want)

        write_mb(mnt, "ten", 10, seed=1)
        # Written after the thaw, while the cycle is sent (from the spool): after the cut.
        r, want, events = await cycle(agent, dev, lambda: write_mb(mnt, "late", 1, seed=3))
        assert (r.kind, r.tracking, r.spool_overflow) == (
            "delta", {"sda": "blocktrace"}, False)
        assert 10_000_000 <= r.spooled_bytes == r.bytes_read <= SPOOL_MB << 20
        # Opened before the freeze; thawed before the first block was sent: the freeze
        # lasted for the trackers' cut and the copy.
        assert events == SPOOLED
        await point_is(procserver, tmp_path, key, r.cycle, want)
        assert device_sha(dev) != want  # the late file is on the disk, not in the point
        prom = Path(cfg.metrics_file).read_text()
        assert metric(prom, "last_cycle_spooled_bytes") == r.spooled_bytes
        assert metric(prom, "freeze_spool_overflows_total") == 1

        write_mb(mnt, "twenty", 20, seed=2)  # more than the spool: sent frozen
        r, want, events = await cycle(agent, dev)
        assert (r.tracking, r.spool_overflow, r.spooled_bytes) == (
            {"sda": "blocktrace"}, True, 0)
        assert r.bytes_read >= 20_000_000
        assert events == ["cycle_opened", "cycle_frozen", "freeze_spool_overflow (warning)",
                          "cycle_send_started", "filesystems_thawed"]
        # The late file too: the tracker named it for this cycle.
        await point_is(procserver, tmp_path, key, r.cycle, want)
        prom = Path(cfg.metrics_file).read_text()
        assert metric(prom, "freeze_spool_overflows_total") == 2
        assert metric(prom, "last_cycle_spooled_bytes") == 0
    finally:
        agent.close()


def test_the_spool_setting_is_checked() -> None:
    cfg = MobilityConfig(machine="m", server_host="h", tls_ca="a", tls_cert="c", tls_key="k",
                         state_dir="s", disks=[{"name": "sda", "path": "/dev/null"}],
                         freeze_spool_mb=-1)
    with pytest.raises(ValueError, match="freeze_spool_mb"):
        cfg.validate()



@pytest.mark.usefixtures("tracefs")
async def test_with_scripts_the_post_script_runs_at_the_thaw_before_the_send(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        ext4_mounted: tuple[str, Path]) -> None:
    """``script`` around the freeze: the application is let go (post-script) with the
    filesystem, before the first block is sent; the points are ``app``-consistent. A
    BEGIN the process server refuses (a base it does not know) leaves the hold before
    anything is frozen, and the resync that follows is opened before its freeze."""
    (dev, mnt), log = ext4_mounted, tmp_path / "scripts.log"
    scripts: dict[str, object] = {}
    for phase in ("pre", "post"):
        script = tmp_path / f"{phase}.sh"
        script.write_text(f"#!/bin/sh\necho {phase} >> {log}\n")
        script.chmod(0o755)
        scripts[f"{phase}_script"] = str(script)
    cfg = agent_config(tmp_path, pki, "vm01", procserver.port, {"sda": Path(dev)},
                       snapshot="script", freeze_mounts=[str(mnt)], tracker="blocktrace",
                       **scripts)
    cfg.validate()
    agent = Agent(cfg)
    try:
        # The full copy (64 MiB: within the default spool), a delta, a resync.
        for seed, kind in ((1, "full"), (2, "delta"), (3, "resync")):
            write_mb(mnt, f"s{seed}", 2, seed)
            log.write_text("")
            if kind == "resync":  # the agent's base, unknown to the process server
                state = Path(cfg.state_dir) / "state.json"
                doc = json.loads(state.read_text())
                state.write_text(json.dumps({**doc, "last_cycle": uuid.uuid4().hex}))
            at_first_send: list[list[str]] = []

            def scripts_run(at: list[list[str]] = at_first_send) -> None:
                at.append(log.read_text().split())

            r, want, events = await cycle(agent, dev, scripts_run)
            assert (r.kind, r.consistency) == (kind, "app")
            assert r.spooled_bytes == r.bytes_read > 0
            if kind == "resync":  # refused: out of the hold (pre, post), nothing frozen
                assert events == ["resync_required", *SPOOLED]
                assert at_first_send == [["pre", "post", "pre", "post"]]
            else:
                assert events == SPOOLED
                assert at_first_send == [["pre", "post"]]
            if kind == "delta":
                assert r.tracking == {"sda": "blocktrace"}
            await point_is(procserver, tmp_path, vault_at[1], r.cycle, want)
    finally:
        agent.close()
