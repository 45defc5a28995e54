"""``bench_rpo.py --freeze``: how long ``snapshot = "fsfreeze"`` keeps the filesystem
frozen per cycle, with the spool and without (see bench_rpo's docstring)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import statistics
import subprocess
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import structlog
import uvloop
from bench_e2e import SiteRecovery, clean, say
from loopfs import cancelled_by_sigterm, loop_disk

from mobility.agent import Agent

TARGET_FREEZE_S = 0.1


@contextlib.contextmanager
def ext4_mounted(work: Path, image: Path) -> Iterator[tuple[Path, Path]]:
    """An ext4 made on ``image`` attached to a loop device (root), mounted: (device,
    mount point); unmounted afterwards."""
    mnt = work / "freeze-mnt"
    with loop_disk(work, image) as dev:
        subprocess.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        str(dev)], check=True)
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", str(dev), str(mnt)], check=True)
        try:
            yield dev, mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
            with contextlib.suppress(OSError):
                mnt.rmdir()


async def bench_freeze(args: argparse.Namespace) -> dict[str, Any]:
    cancelled_by_sigterm()
    if os.geteuid() != 0:
        raise SystemExit("--freeze needs root (a loop device, mount, fsfreeze, tracefs)")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clean(work)
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(args.size_mib << 20)
    with ext4_mounted(work, image) as (dev, mnt):
        return await freeze_rounds(args, work, dev, mnt)


def write_changes(mnt: Path, mb: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(mb):
        fd = os.open(mnt / f"c{seed}-{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, rng.randbytes(1_000_000))
            os.fsync(fd)
        finally:
            os.close(fd)


class Marks:
    """The agent's events that time the parts of a freeze, kept while logs stay quiet
    (warnings only, as ``quiet_logs``)."""

    WANT = ("cycle_frozen", "cycle_spooled")

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        structlog.configure(
            processors=[structlog.processors.add_log_level, self.keep,
                        structlog.dev.ConsoleRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))

    def keep(self, _logger: Any, _method: str, ev: MutableMapping[str, Any]
             ) -> MutableMapping[str, Any]:
        if ev.get("event") in self.WANT:
            self.seen.append(dict(ev))
        if ev.get("level") in ("debug", "info"):
            raise structlog.DropEvent
        return ev

    def take(self, event: str, key: str) -> float | None:
        """``key`` of the last ``event`` seen since ``clear`` (None: none)."""
        got = [e[key] for e in self.seen if e["event"] == event]
        return got[-1] if got else None

    def clear(self) -> None:
        self.seen.clear()


async def freeze_rounds(args: argparse.Namespace, work: Path, dev: Path, mnt: Path
                        ) -> dict[str, Any]:
    marks = Marks()
    sr = SiteRecovery(work, dev)
    await sr.start()
    assert sr.agent is not None
    res: dict[str, Any] = {"image_bytes": args.size_mib << 20, "changes_mb": args.changes_mb,
                           "rounds": args.rounds, "target_freeze_s": TARGET_FREEZE_S,
                           "cpus": os.cpu_count()}
    try:
        seed = args.seed
        for spool_mb in (128, 0):
            cfg = dataclasses.replace(sr.agent.cfg, snapshot="fsfreeze",
                                      freeze_mounts=[str(mnt)], tracker="blocktrace",
                                      freeze_spool_mb=spool_mb)
            cfg.validate()
            sr.agent.close()
            sr.agent = Agent(cfg)
            say(f"freeze_spool_mb = {spool_mb}: a first cycle (tracing starts), then "
                f"{args.rounds} rounds of {args.changes_mb} MB of changes")
            await sr.agent.replicate_once()
            holds, spooled, kernel, copies = [], [], [], []
            for _ in range(args.rounds):
                seed += 1
                await asyncio.to_thread(write_changes, mnt, args.changes_mb, seed)
                marks.clear()
                r = await sr.agent.replicate_once()
                if r.tracking != {"sda": "blocktrace"}:
                    raise SystemExit(f"the cycle was not tracked: {r.tracking} {r.fallbacks}")
                holds.append(r.held_seconds)
                spooled.append(r.spooled_bytes)
                if (k := marks.take("cycle_frozen", "seconds")) is not None:
                    kernel.append(k)
                if (c := marks.take("cycle_spooled", "copy_seconds")) is not None:
                    copies.append(c)
            key = "spool" if spool_mb else "no_spool"
            res[f"{key}_freeze_median_s"] = round(statistics.median(holds), 4)
            res[f"{key}_freeze_max_s"] = round(max(holds), 4)
            res[f"{key}_spooled_median_bytes"] = int(statistics.median(spooled))
            res[f"{key}_freeze_each_s"] = [round(h, 4) for h in holds]
            res[f"{key}_kernel_freeze_each_s"] = [round(k, 4) for k in kernel]
            # The parts (agents before the events existed have none).
            res[f"{key}_kernel_freeze_median_s"] = (round(statistics.median(kernel), 4)
                                                    if kernel else None)
            if spool_mb:
                res["spool_copy_median_s"] = (round(statistics.median(copies), 4)
                                              if copies else None)
    finally:
        await sr.stop()
    res["max_vs_target"] = round(res["spool_freeze_max_s"] / TARGET_FREEZE_S, 2)
    return res


def main_freeze(args: argparse.Namespace) -> int:
    try:
        res = uvloop.run(bench_freeze(args))
    finally:
        clean(Path(args.work).resolve())
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"fsfreeze hold per cycle ({res['changes_mb']} MB of changes, {res['rounds']} "
              f"cycles, ext4 on a {res['image_bytes'] >> 20} MiB loop device, blocktrace):")
        for key, what in (("spool", "with the spool"), ("no_spool", "without (sent frozen)")):
            print(f"  {what}: median {res[f'{key}_freeze_median_s'] * 1000:.0f} ms   max "
                  f"{res[f'{key}_freeze_max_s'] * 1000:.0f} ms   spooled "
                  f"{res[f'{key}_spooled_median_bytes'] / 1e6:.1f} MB")
        if res["spool_kernel_freeze_median_s"] is not None:
            print(f"  with the spool, medians of its parts: the kernel's freeze "
                  f"{res['spool_kernel_freeze_median_s'] * 1000:.0f} ms, the copy "
                  f"{(res['spool_copy_median_s'] or 0) * 1000:.0f} ms")
        print(f"  max / target ({TARGET_FREEZE_S * 1000:g} ms): {res['max_vs_target']:.2f}x")
    return 0 if res["spool_freeze_max_s"] <= TARGET_FREEZE_S else 1
