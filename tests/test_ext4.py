"""A real protected disk: ext4 on a loop device, written by a workload while it replicates.

Each point is taken under ``fsfreeze``; every materialized point must pass
``e2fsck -fn`` and hold, byte for byte, every file the workload had finished
(written, fsynced, closed) before that cycle began.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mobility.agent import Agent
from procserver.server import ProcServer
from tests.backends import missing_backend
from tests.helpers import Pki, agent_config, open_vault
from vault.materialize import materialize

pytestmark = pytest.mark.root
IMAGE = 160 << 20


def _need_root_tools() -> None:
    if os.geteuid() != 0:
        missing_backend("root (loop devices, mount, fsfreeze)", "run the suite as root")
    for tool in ("losetup", "mkfs.ext4", "e2fsck", "fsfreeze", "mount", "umount"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs e2fsprogs and util-linux")


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def loop_device(image: Path) -> Iterator[str]:
    dev = _run("losetup", "--find", "--show", str(image))
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


@contextmanager
def mounted(source: str, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    _run("mount", *options, source, str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


class Workload:
    """Writes new files (never rewrites one) in a thread, a batch per ``release()``; a file
    counts as finished once it is written, fsynced, closed and its directory fsynced."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root, self.rng = root, random.Random(seed)
        self.finished: dict[str, str] = {}
        self._lock = threading.Lock()
        self._todo: queue.Queue[bool] = queue.Queue()  # True: write a file; False: stop
        self._n = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def release(self, files: int) -> None:
        for _ in range(files):
            self._todo.put(True)

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self.finished)

    def stop(self) -> None:
        """Finish every released file, then stop."""
        self._todo.put(False)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while self._todo.get():
                self._n += 1
                sub = self.root / f"d{self._n % 7}"
                sub.mkdir(exist_ok=True)
                name = f"d{self._n % 7}/f{self._n:05d}"
                data = self.rng.randbytes(self.rng.randrange(1, 256 << 10))
                fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                dfd = os.open(sub, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                with self._lock:
                    self.finished[name] = hashlib.sha256(data).hexdigest()
        except BaseException as e:  # surfaced by stop()
            self.error = e


@pytest.mark.parametrize("label", ["crash", "app"])
async def test_ext4_on_a_loop_device_replicated_under_a_workload(
        tmp_path: Path, pki: Pki, procserver: ProcServer, vault_at: tuple[str, Path],
        label: str) -> None:
    """``crash``: fsfreeze alone; ``app``: the application's pre/post scripts around the
    fsfreeze (the scripts here log that they ran, as an application quiesce would)."""
    _need_root_tools()
    log = tmp_path / "scripts.log"
    scripts: dict[str, object] = {}
    if label == "app":
        for phase in ("pre", "post"):
            script = tmp_path / f"{phase}.sh"
            script.write_text(f"#!/bin/sh\necho {phase} >> {log}\n")
            script.chmod(0o755)
            scripts[f"{phase}_script"] = str(script)
        scripts["snapshot"] = "script"
    else:
        scripts["snapshot"] = "fsfreeze"
    image = tmp_path / "protected.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE)
    _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
    expected: dict[str, dict[str, str]] = {}
    with loop_device(image) as dev, mounted(dev, tmp_path / "mnt") as mnt:
        cfg = agent_config(tmp_path, pki, "ext4host", procserver.port, {"sda": Path(dev)},
                           freeze_mounts=[str(mnt)], **scripts)
        agent = Agent(cfg)
        work = Workload(mnt, seed=11)
        try:
            work.release(40)
            for _cycle in range(4):
                before = work.snapshot()  # finished before this cycle began
                work.release(60)  # and the workload keeps writing during the cycle
                r = await agent.replicate_once()
                assert r.consistency == label
                expected[r.cycle] = before
            work.stop()  # every released file finished: the last point must hold them all
            r = await agent.replicate_once()
            expected[r.cycle] = work.snapshot()
        finally:
            if work._thread.is_alive():
                work.stop()
            agent.close()
    assert len(expected[r.cycle]) == 40 + 4 * 60
    if label == "app":
        assert log.read_text().split() == ["pre", "post"] * 5
    points = {cycle: await procserver.wait_point(cycle) for cycle in expected}
    vault = await open_vault(tmp_path / "vault", vault_at[1])
    index = await vault.load_index()
    try:
        for cycle, files in expected.items():
            point = await vault.read_point(points[cycle])
            assert point.consistency == label
            out = tmp_path / f"restored-{cycle[:8]}.img"
            await materialize(vault, point, "sda", str(out), index=index)
            fsck = await asyncio.create_subprocess_exec(
                "e2fsck", "-fn", str(out), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            report, _ = await fsck.communicate()
            assert fsck.returncode == 0, report.decode()
            with loop_device(out) as rdev, \
                    mounted(rdev, tmp_path / "check", "-o", "ro,noload") as check:
                for name, digest in files.items():
                    got = hashlib.sha256((check / name).read_bytes()).hexdigest()
                    assert got == digest, f"{name} differs in point {point.id}"
            out.unlink()
    finally:
        await vault.close()
