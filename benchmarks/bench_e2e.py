"""End-to-end benchmark: siterecovery against restic (and borg, rsync) on one disk image.

Steps, each timed in the same run on the same warm image file:

1. initial    siterecovery: agent initial cycle (the agent in a process of its own,
              ``agentworker.py``, started before the timed steps as its daemon would be;
              ``--agent inline``: in this process) -> mutual TLS -> process server ->
              fsynced HRL cache -> packs in the local-folder vault, until the
              recovery point is whole.  restic: ``restic backup`` into a fresh
              local repository.  borg (optional): ``borg create --compression lz4``.
2. incremental  2 % of the image is overwritten in scattered 64 KiB blocks, then
              siterecovery: delta cycle until the point is whole; restic/borg: a
              second backup; rsync (optional): ``rsync --inplace --no-whole-file``
              onto a copy of the pre-change image.
3. restore    siterecovery: materialize the latest point to a raw image (vault and
              key only); restic: ``restic restore latest``. Both repositories are
              evicted from the page cache first (cold, as after a disaster; the
              siterecovery vault writes its packs past the cache). Both are verified by
              sha256 against the source outside the timed part.
4. repository size after each backup step, and its growth from the incremental.

With ``--tracker reflink`` (root) the image lies on an XFS with reflinks on a loop device
and the agent clones it each cycle (``snapshot = "reflink"``): the incremental reads
the extents the change rewrote, not the whole image; every tool reads the same file.

Run: ``.venv/bin/python benchmarks/bench_e2e.py [--size-mib N] [--work DIR] [--seed S]
[--steps initial,...] [--tracker scan|reflink] [--agent process|inline] [--json]``.
Every step's wall time and CPU seconds (on every core) are reported for every tool.
Not a test: nothing here runs under pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import uvloop
from diskgen import generate, mutate, sha256_file
from loopfs import xfs_folder

from common.gcsettle import settle_startup_heap
from mobility import agentfile
from mobility.agent import Agent
from mobility.config import MobilityConfig
from mobility.snapshot import Quiesced
from siterecovery.agentcmds import enroll
from siterecovery.embedded import Embedded, start_embedded, stop_embedded
from siterecovery.tomlconfig import load
from vault.check import check_vault
from vault.keyslots import KeyMaterial, read_keyfile
from vault.materialize import materialize
from vault.pack import FRAME_BYTES, ZSTD_LEVEL
from vault.repo import Vault
from vault.store.local import LocalStore

MACHINE = "bench-vm"
STEPS = ("initial", "incremental", "restore", "check")
PASSWORD = "bench-not-a-secret"
CHANGE_FRACTION = 0.02
CHANGE_BLOCK = 64 * 1024
WAIT_POINT_SECONDS = 3600.0
# Everything this script creates under --work; only these names are ever deleted.
OWNED = ("disk.img", "sr", "agent", "restic-repo", "restic-cache", "borg-repo", "borg-home",
         "rsync-copy.img", "restore-sr", "restore-restic")


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def tree_bytes(root: Path) -> int:
    """``du --apparent-size``-style: the sum of the sizes of the regular files under ``root``."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            p = os.path.join(dirpath, fn)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if not os.path.islink(p):
                total += st.st_size
    return total


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


async def run_cmd(argv: Sequence[str], env: dict[str, str] | None = None) -> None:
    """Run a command to completion (the event loop keeps running); raise on failure."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                           f"{err.decode(errors='replace').strip()[-2000:]}")


def evict(root: Path) -> None:
    """Drop every file under ``root`` from the page cache (no root privileges needed)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


#: children that outlive a step (the agent's process): their CPU time is read from /proc
LIVE_CHILDREN: list[int] = []


def live_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (0 once it is gone); less
    sensitive than wall time to other work on the machine."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time (user + system) of this process (every thread: the servers, the vault's
    workers, an inline agent), of its children waited for (restic, borg, rsync) and of
    those still running (``LIVE_CHILDREN``: the agent's own process)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
            + sum(live_cpu_seconds(pid) for pid in LIVE_CHILDREN))


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


async def measure(res: Results, step: str, tool: str, fn: Callable[[], Awaitable[None]]
                  ) -> None:
    """Run one tool's step: its wall time into ``res.seconds``, the CPU seconds it took
    (on every core) into ``res.cpu``. One step runs at a time, so the process's and its
    children's CPU time between the two ends is that tool's alone. The page cache's dirty
    data is written back first (not timed): no tool pays for writing back what the image's
    generation or the tool before it wrote."""
    await asyncio.to_thread(os.sync)
    cpu = cpu_seconds()
    res.seconds[step][tool] = await timed(fn)
    res.cpu[step][tool] = cpu_seconds() - cpu


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=lambda: {s: {} for s in STEPS})
    cpu: dict[str, dict[str, float]] = field(default_factory=lambda: {s: {} for s in STEPS})
    repo_after_initial: dict[str, int] = field(default_factory=dict)
    repo_after_incremental: dict[str, int] = field(default_factory=dict)
    verified: dict[str, bool] = field(default_factory=dict)
    siterecovery: dict[str, Any] = field(default_factory=dict)

    def growth(self) -> dict[str, int]:
        return {t: self.repo_after_incremental[t] - self.repo_after_initial[t]
                for t in self.repo_after_incremental if t in self.repo_after_initial}

    def mbps(self) -> dict[str, dict[str, float]]:
        size = int(self.meta["image_bytes"])
        return {s: {t: size / 1e6 / sec for t, sec in d.items() if sec > 0}
                for s, d in self.seconds.items()}

    def ratios(self) -> dict[str, float]:
        return {s: d["siterecovery"] / d["restic"] for s, d in self.seconds.items()
                if "siterecovery" in d and d.get("restic")}

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(growth_bytes=self.growth(), mb_per_s=self.mbps(),
                   ratio_siterecovery_over_restic=self.ratios(),
                   cpu_ratio_siterecovery_over_restic={
                       s: d["siterecovery"] / d["restic"] for s, d in self.cpu.items()
                       if "siterecovery" in d and d.get("restic")})
        return doc


# -- the tools ---------------------------------------------------------------------------


class Restic:
    def __init__(self, work: Path) -> None:
        self.repo = work / "restic-repo"
        self.env = {"RESTIC_REPOSITORY": str(self.repo), "RESTIC_PASSWORD": PASSWORD,
                    "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        helptext = subprocess.run(["restic", "backup", "--help"], capture_output=True,
                                  text=True, check=False).stdout
        self.no_scan = "--no-scan" in helptext

    async def init(self) -> None:
        await run_cmd(["restic", "init"], self.env)

    def repo_version(self) -> int | None:
        out = subprocess.run(["restic", "cat", "config"], capture_output=True, text=True,
                             env={**os.environ, **self.env}, check=False)
        try:
            return int(json.loads(out.stdout)["version"])
        except (ValueError, KeyError):
            return None

    async def backup(self, image: Path) -> None:
        await run_cmd(["restic", "backup", "--quiet", *(["--no-scan"] if self.no_scan else []),
                       str(image)], self.env)

    async def restore(self, target: Path) -> None:
        await run_cmd(["restic", "restore", "latest", "--quiet", "--target", str(target)],
                      self.env)

    async def check(self) -> None:
        await run_cmd(["restic", "check", "--read-data", "--quiet"], self.env)


class Borg:
    def __init__(self, work: Path) -> None:
        self.repo = work / "borg-repo"
        self.env = {"BORG_PASSPHRASE": PASSWORD, "BORG_BASE_DIR": str(work / "borg-home")}

    async def init(self) -> None:
        await run_cmd(["borg", "init", "--encryption", "repokey", str(self.repo)], self.env)

    async def create(self, name: str, image: Path) -> None:
        await run_cmd(["borg", "create", "--compression", "lz4", f"{self.repo}::{name}",
                       str(image)], self.env)


class SiteRecovery:
    def __init__(self, work: Path, image: Path, snapshot: str = "none",
                 procserver: dict[str, Any] | None = None, agent: str = "process") -> None:
        """``snapshot``: the agent's (``reflink``: it clones the image each cycle and its
        tracker compares the clones' extents; else it reads the image whole).
        ``procserver``: process-server settings (``pack_zstd_level``...)."""
        self.work, self.image, self.snapshot = work, image, snapshot
        self.procserver = procserver or {}
        self.mode = agent
        self.e: Embedded | None = None
        self.agent: Agent | None = None
        self.worker: asyncio.subprocess.Process | None = None
        self.cycles: list[dict[str, Any]] = []

    async def start(self) -> None:
        self.e = await start_embedded(self.work / "sr", admin_port=0, site_port=0, listen_port=0,
                                      metrics_port=0, procserver=self.procserver)
        cfg = await enroll(self.e.config.url, self.e.config.admin_token, MACHINE,
                           f"127.0.0.1:{self.e.proc.port}", [f"sda={self.image}"],
                           self.work / "agent")
        if self.mode == "process":  # a daemon of its own, as on a protected machine
            agentfile.update(cfg, {"snapshot": "reflink" if self.snapshot == "reflink"
                                   else "quiesced"})
            self.worker = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).with_name("agentworker.py")), str(cfg),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            LIVE_CHILDREN.append(self.worker.pid)
            assert self.worker.stdout is not None
            if await self.worker.stdout.readline() != b"ready\n":  # its start-up is over
                raise RuntimeError(f"the agent's process exited {await self.worker.wait()}")
        else:
            conf = dataclasses.replace(load(MobilityConfig, cfg), snapshot=self.snapshot)
            self.agent = Agent(conf,
                               provider=None if self.snapshot == "reflink" else Quiesced())
        # The servers (and an inline agent) have started: as their daemons do then
        # (``siterecovery serve``, ``mobility run``), start-up's objects leave the
        # collector's full collections.
        settle_startup_heap()

    @property
    def vault_dir(self) -> Path:
        return self.work / "sr" / "vault"

    async def cycle(self) -> None:
        """One agent cycle, acknowledged, then waited on until its point is whole."""
        assert self.e is not None
        pid = self.worker.pid if self.worker is not None else None
        agent_cpu = live_cpu_seconds(pid) if pid is not None else 0.0
        t = time.perf_counter()
        r = await self._replicate()
        acked = time.perf_counter() - t
        if pid is not None:
            agent_cpu = live_cpu_seconds(pid) - agent_cpu
        point = await self.e.proc.wait_point(r["cycle"], timeout=WAIT_POINT_SECONDS)
        self.cycles.append({"cycle": r["cycle"], "point": point, "full": r["full"],
                            "blocks_sent": r["blocks_sent"], "bytes_sent": r["bytes_sent"],
                            "acked_after_s": round(acked, 3),
                            "whole_after_s": round(time.perf_counter() - t, 3),
                            # the agent's own process (None: inline, in the servers')
                            "agent_cpu_s": round(agent_cpu, 3) if pid is not None else None})

    async def _replicate(self) -> dict[str, Any]:
        """One cycle of the agent: in its own process (``agentworker.py``, started once
        like the agent's daemon: not timed), or (``--agent inline``) in this one, beside
        the servers."""
        if self.agent is not None:
            return dataclasses.asdict(await self.agent.replicate_once())
        worker = self.worker
        assert worker is not None and worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(b"cycle\n")
        await worker.stdin.drain()
        line = await worker.stdout.readline()
        if not line:
            await worker.wait()
            raise RuntimeError(f"the agent's process exited {worker.returncode}")
        doc: dict[str, Any] = json.loads(line)
        return doc

    async def stop(self) -> None:
        if self.worker is not None:
            assert self.worker.stdin is not None
            self.worker.stdin.close()  # end of its input: it closes the agent and exits
            await self.worker.wait()  # its CPU time now counts in RUSAGE_CHILDREN
            LIVE_CHILDREN.remove(self.worker.pid)
            self.worker = None
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.e is not None:
            await stop_embedded(self.e)
            self.e = None

    async def restore(self, out: Path) -> None:
        """Materialize the latest point from the vault and its key alone."""
        v = await Vault.open(LocalStore(self.vault_dir),
                             KeyMaterial(keyfile=read_keyfile(self.work / "sr" / "vault.key")))
        try:
            index = await v.load_index()
            points = await v.list_points(MACHINE)
            want = self.cycles[-1]["cycle"]
            point = next(p for p in points if p.cycle == want)
            with ThreadPoolExecutor(2) as ex:
                await materialize(v, point, "sda", str(out), index=index, executor=ex)
        finally:
            await v.close()


# -- the run ------------------------------------------------------------------------------


def ensure_tool(command: str, package: str) -> None:
    """Install ``package`` with apt-get when ``command`` is missing (restic, borg)."""
    if shutil.which(command):
        return
    say(f"{command} is missing; installing {package} with apt-get")
    subprocess.run(["apt-get", "install", "-y", package], check=True,
                   stdout=subprocess.DEVNULL)


def clean(work: Path) -> None:
    for name in OWNED:
        p = work / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


async def bench(args: argparse.Namespace) -> Results:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clean(work)
    if args.tracker == "reflink":  # the image, its changes and the agent's clone
        with xfs_folder(work, 2 * (args.size_mib << 20) + (512 << 20)) as folder:
            return await _bench(args, work, folder / "disk.img")
    return await _bench(args, work, work / "disk.img")


async def _bench(args: argparse.Namespace, work: Path, image: Path) -> Results:
    size = args.size_mib << 20
    ensure_tool("restic", "restic")
    if not args.no_borg:
        ensure_tool("borg", "borgbackup")
    use_borg = not args.no_borg
    use_rsync = not args.no_rsync and shutil.which("rsync") is not None
    res = Results()
    res.meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"), "seed": args.seed,
        "image_bytes": size, "cpus": os.cpu_count(), "python": platform.python_version(),
        "restic": tool_version(["restic", "version"]),
        "borg": tool_version(["borg", "--version"]) if use_borg else None,
        "rsync": tool_version(["rsync", "--version"]) if use_rsync else None,
        "change_fraction": CHANGE_FRACTION, "change_block": CHANGE_BLOCK,
        "tracker": args.tracker, "agent": args.agent,
        "pack_zstd_level": args.pack_zstd_level, "pack_frame_bytes": args.pack_frame_bytes,
        "procserver_set": args.procserver_set, "zeros": args.zeros,
    }

    steps = args.steps
    res.meta["steps"] = list(steps)
    say(f"generating a {args.size_mib} MiB image (seed {args.seed}) in {work}")
    t = time.perf_counter()
    layout = generate(image, size, args.seed, holes=args.zeros == "holes")
    res.meta["layout"] = layout.describe()
    res.meta["image_allocated_bytes"] = os.stat(image).st_blocks * 512
    say(f"  {layout.describe()} in {time.perf_counter() - t:.1f} s")
    expected = sha256_file(image)  # also warms the page cache for every tool alike

    restic = Restic(work)
    borg = Borg(work) if use_borg else None
    sr = SiteRecovery(work, image, "reflink" if args.tracker == "reflink" else "none",
                      {"pack_zstd_level": args.pack_zstd_level,
                       "pack_frame_bytes": args.pack_frame_bytes, **args.procserver_set},
                      args.agent)
    await restic.init()
    res.meta["restic_repo_version"] = restic.repo_version()
    res.meta["restic_no_scan"] = restic.no_scan
    if borg is not None:
        await borg.init()
    await sr.start()
    try:
        # 1. initial replication / first backup
        say("step 1: initial")
        await measure(res, "initial", "siterecovery", sr.cycle)
        res.repo_after_initial["siterecovery"] = tree_bytes(sr.vault_dir)
        say(f"  siterecovery {res.seconds['initial']['siterecovery']:.2f} s, "
            f"cpu {res.cpu['initial']['siterecovery']:.2f} s")
        await measure(res, "initial", "restic", lambda: restic.backup(image))
        res.repo_after_initial["restic"] = tree_bytes(restic.repo)
        say(f"  restic       {res.seconds['initial']['restic']:.2f} s, "
            f"cpu {res.cpu['initial']['restic']:.2f} s")
        if borg is not None:
            b = borg
            await measure(res, "initial", "borg", lambda: b.create("initial", image))
            res.repo_after_initial["borg"] = tree_bytes(b.repo)
            say(f"  borg         {res.seconds['initial']['borg']:.2f} s, "
                f"cpu {res.cpu['initial']['borg']:.2f} s")
        copy = work / "rsync-copy.img"
        use_rsync = use_rsync and "incremental" in steps
        if use_rsync:
            await run_cmd(["cp", "--sparse=always", str(image), str(copy)])
            # Backdate the copy: a change within the same second as the copy would
            # otherwise pass rsync's size+mtime quick check and be skipped.
            old = os.stat(image).st_mtime - 86400
            os.utime(copy, (old, old))

        # 2. change 2 % in scattered 64 KiB blocks, then the incremental
        if "incremental" in steps:
            n = mutate(image, CHANGE_FRACTION, args.seed + 1000, CHANGE_BLOCK)
            res.meta["changed_blocks"] = n
            res.meta["changed_bytes"] = n * CHANGE_BLOCK
            expected = sha256_file(image)  # also re-warms the changed pages
            say(f"step 2: incremental ({n} blocks of 64 KiB changed)")
            await measure(res, "incremental", "siterecovery", sr.cycle)
            res.repo_after_incremental["siterecovery"] = tree_bytes(sr.vault_dir)
            say(f"  siterecovery {res.seconds['incremental']['siterecovery']:.2f} s, "
                f"cpu {res.cpu['incremental']['siterecovery']:.2f} s")
        await sr.stop()  # from here on siterecovery is the vault and its key only
        if "incremental" in steps:
            await measure(res, "incremental", "restic", lambda: restic.backup(image))
            res.repo_after_incremental["restic"] = tree_bytes(restic.repo)
            say(f"  restic       {res.seconds['incremental']['restic']:.2f} s, "
                f"cpu {res.cpu['incremental']['restic']:.2f} s")
            if borg is not None:
                b = borg
                await measure(res, "incremental", "borg",
                    lambda: b.create("incr", image))
                res.repo_after_incremental["borg"] = tree_bytes(b.repo)
                say(f"  borg         {res.seconds['incremental']['borg']:.2f} s, "
                    f"cpu {res.cpu['incremental']['borg']:.2f} s")
        if use_rsync:
            await measure(res, "incremental", "rsync", lambda: run_cmd(
                ["rsync", "--inplace", "--no-whole-file", str(image), str(copy)]))
            say(f"  rsync        {res.seconds['incremental']['rsync']:.2f} s, "
                f"cpu {res.cpu['incremental']['rsync']:.2f} s")
            res.verified["rsync"] = sha256_file(copy) == expected
            copy.unlink()

        # 3. restore the latest point / snapshot; verify outside the timed part
        if "restore" in steps:
            say("step 3: restore")
            out = work / "restore-sr" / "disk.img"
            out.parent.mkdir()
            # Both repositories cold, as a vault is when a disaster strikes: siterecovery
            # writes its packs past the page cache, restic leaves them in it.
            evict(sr.vault_dir)
            evict(restic.repo)
            await measure(res, "restore", "siterecovery", lambda: sr.restore(out))
            res.verified["siterecovery"] = sha256_file(out) == expected
            say(f"  siterecovery {res.seconds['restore']['siterecovery']:.2f} s, "
                f"verified={res.verified['siterecovery']}")
            shutil.rmtree(out.parent)
            target = work / "restore-restic"
            await measure(res, "restore", "restic", lambda: restic.restore(target))
            restored = target / image.relative_to(image.anchor)
            res.verified["restic"] = sha256_file(restored) == expected
            say(f"  restic       {res.seconds['restore']['restic']:.2f} s, "
                f"verified={res.verified['restic']}")
            shutil.rmtree(target)

        # 4. verify the whole repository: every object read, authenticated, decompressed
        if "check" in steps:
            say("step 4: check --read-data")
            report: list[bool] = []

            async def sr_check() -> None:
                with ThreadPoolExecutor(2) as ex:
                    r = await check_vault(
                        LocalStore(sr.vault_dir),
                        KeyMaterial(keyfile=read_keyfile(work / "sr" / "vault.key")),
                        read_data=True, executor=ex)
                report.append(not r.errors and not r.wrong_key)

            await measure(res, "check", "siterecovery", sr_check)
            res.verified["check"] = report == [True]
            say(f"  siterecovery {res.seconds['check']['siterecovery']:.2f} s, clean={report}")
            await measure(res, "check", "restic", restic.check)
            say(f"  restic       {res.seconds['check']['restic']:.2f} s, "
                f"cpu {res.cpu['check']['restic']:.2f} s")
    finally:
        await sr.stop()
    res.siterecovery = {"cycles": sr.cycles}
    return res


# -- output ------------------------------------------------------------------------------


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render(res: Results) -> str:
    m, mb, ratios = res.meta, res.mbps(), res.ratios()
    lines = [
        f"siterecovery end-to-end benchmark — {m['date']}, {m['cpus']} CPUs, "
        f"image {m['image_bytes'] >> 20} MiB ({m['layout']}), seed {m['seed']}",
        (f"incremental: {m['changed_blocks']} scattered 64 KiB blocks "
         f"({m['changed_bytes'] / 1e6:.1f} MB) changed; " if "changed_blocks" in m else
         f"steps run: {', '.join(m['steps'])}; ") + "MB/s = image size / seconds",
        f"restic: {m['restic']} (repository v{m['restic_repo_version']}, "
        f"--no-scan {'used' if m['restic_no_scan'] else 'not supported'})",
        "",
        f"{'step':<12} {'siterecovery s':>14} {'restic s':>9} {'sr/restic':>9} "
        f"{'sr MB/s':>8} {'restic MB/s':>11} {'borg s':>7} {'rsync s':>8}",
    ]
    for step in STEPS:
        d = res.seconds[step]
        ratio = ratios.get(step)
        lines.append(
            f"{step:<12} {_s(d.get('siterecovery')):>14} {_s(d.get('restic')):>9} "
            f"{'-' if ratio is None else f'{ratio:.2f}x':>9} "
            f"{_s(mb[step].get('siterecovery')):>8} {_s(mb[step].get('restic')):>11} "
            f"{_s(d.get('borg')):>7} {_s(d.get('rsync')):>8}")
    lines += ["", f"{'CPU seconds':<12} {'siterecovery':>14} {'restic':>9} {'sr/restic':>9} "
                  f"{'borg':>8} {'rsync':>11}"]
    for step in STEPS:
        c = res.cpu[step]
        if not c:
            continue
        sr, rs = c.get("siterecovery"), c.get("restic")
        lines.append(
            f"{step:<12} {_s(sr):>14} {_s(rs):>9} "
            f"{f'{sr / rs:.2f}x' if sr is not None and rs else '-':>9} "
            f"{_s(c.get('borg')):>8} {_s(c.get('rsync')):>11}")
    growth = res.growth()
    tools = [t for t in ("siterecovery", "restic", "borg") if t in res.repo_after_initial]
    lines += ["", f"{'repository bytes':<22}" + "".join(f"{t:>16}" for t in tools)]
    for label, row in (("after initial", res.repo_after_initial),
                       ("after incremental", res.repo_after_incremental),
                       ("growth (incremental)", growth)):
        lines.append(f"{label:<22}" + "".join(f"{row.get(t, 0):>16,}" for t in tools))
    lines.append("")
    lines.append("verified by sha256 against the source: " + ", ".join(
        f"{t} {'OK' if res.verified[t] else 'MISMATCH'}"
        for t in ("siterecovery", "restic", "rsync", "check") if t in res.verified))
    for c in res.siterecovery.get("cycles", []):
        lines.append(f"siterecovery {'full' if c['full'] else 'delta'} cycle: "
                     f"{c['blocks_sent']} blocks, {c['bytes_sent'] / 1e6:.1f} MB sent, "
                     f"acked after {c['acked_after_s']:.2f} s, "
                     f"point whole after {c['whole_after_s']:.2f} s"
                     + ("" if c.get("agent_cpu_s") is None
                        else f", agent's CPU {c['agent_cpu_s']:.2f} s"))
    return "\n".join(lines)


def quiet_logs() -> None:
    """siterecovery logs JSON to stdout; here only warnings, and to stderr."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _setting(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=INTEGER")
    return key, int(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=2048, help="image size (default 2048)")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "work"),
                    help="working directory (default benchmarks/work/, git-ignored)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the image and the changes")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--json-out", metavar="FILE", help="also write the JSON results to FILE")
    ap.add_argument("--keep", action="store_true",
                    help="keep the image and repositories in --work after the run")
    ap.add_argument("--no-borg", action="store_true",
                    help="skip the borg columns (else borg is installed if missing)")
    ap.add_argument("--no-rsync", action="store_true", help="skip the rsync column")
    ap.add_argument("--pack-zstd-level", type=int, default=ZSTD_LEVEL,
                    help="the process server's pack_zstd_level (default %(default)s)")
    ap.add_argument("--pack-frame-bytes", type=int, default=FRAME_BYTES,
                    help="the process server's pack_frame_bytes (default %(default)s)")
    ap.add_argument("--zeros", choices=("holes", "written"), default="holes",
                    help="the image's zero chunks: holes (an image file, default), or "
                         "written as zeros (a block device, a preallocated image: every "
                         "tool reads and checks them)")
    ap.add_argument("--procserver-set", metavar="KEY=INT", action="append", default=[],
                    type=_setting,
                    help="another process-server setting for the run, such as "
                         "segment_bytes=16777216 or upload_threads=3 (repeatable)")
    ap.add_argument("--agent", choices=("process", "inline"), default="process",
                    help="where siterecovery's agent runs: process, a process of its own "
                         "started once (agentworker.py, as the agent's daemon runs on a "
                         "protected machine); inline, in the benchmark's process beside "
                         "the servers (one interpreter, one GIL for both ends; default "
                         "process)")
    ap.add_argument("--tracker", choices=("scan", "reflink"), default="scan",
                    help="how siterecovery's agent finds the changed blocks: scan reads "
                         "the whole image every cycle; reflink (root) puts the image on "
                         "an XFS loop device, clones it each cycle and compares extents "
                         "(every tool then reads the image from there; default scan)")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help="comma-separated steps to run, in their fixed order, from "
                         f"{', '.join(STEPS)} (default: all); 'initial' always runs, and "
                         "restore and check then use the initial point when the "
                         "incremental is left out")
    args = ap.parse_args(argv)
    if args.size_mib < 1:
        ap.error("--size-mib must be at least 1")
    steps = {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = steps - set(STEPS)
    if unknown:
        ap.error(f"--steps: unknown step(s) {', '.join(sorted(unknown))}; "
                 f"choose from {', '.join(STEPS)}")
    args.steps = tuple(s for s in STEPS if s in steps or s == "initial")
    args.procserver_set = dict(args.procserver_set)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    try:
        res = uvloop.run(bench(args))
    finally:
        if not args.keep:
            clean(Path(args.work).resolve())
    doc = json.dumps(res.to_json(), indent=2)
    if args.json_out:
        Path(args.json_out).write_text(doc + "\n")
    print(doc if args.json else render(res))
    return 0 if all(res.verified.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
