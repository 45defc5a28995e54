"""RPO under sustained churn: how old is the newest recovery point, moment by moment?

Setup: the seeded image (2 GiB by default) is protected through the real path
(agent -> mutual TLS -> process server -> fsynced cache -> local-folder vault) on
the embedded defaults. After the initial replication a writer does random 64 KiB
writes at 10 MB/s for 60 s while the agent replicates back to back (continuous
replication: a new cycle as soon as the previous one is acknowledged).

Measured: for every 50 ms of the churn window, the age of the newest recovery point
that was whole in the vault at that moment, counted from the start of its cycle (an
upper bound of the true age). Printed: median, p99 and max, against the target
(p99 at most 10 s); the bytes the agent read per cycle against the bytes written per
cycle; the CPU seconds per minute of this whole process (agent, process server and
configuration server together: they share it).

``--tracker scan`` (the default): the image lies in the working directory and every
cycle reads all of it (no snapshot: points are labelled ``inconsistent``).
``--tracker reflink`` (root): the image lies on an XFS made with reflink=1 on a loop
device in the working directory; each cycle reads a reflink clone (``snapshot =
"reflink"``) and only the extents no longer shared with the last cycle's clone.
``--tracker blocktrace`` (root, tracefs; mounted for the run if it is not): the image
is attached to a loop device, which is protected and written to; each cycle reads
only the blocks the kernel's block trace events say were written. ``--tracker libvirt``
(root, libvirtd): the image, converted to qcow2, is the disk of a running domain
without an OS (``lvguest.py``); the writes are made inside QEMU (``qemu-io`` through the
monitor, one byte value per write) and each cycle reads, from a pull-mode backup over
NBD, only the blocks QEMU's dirty bitmap names.

``--freeze`` (root, tracefs) measures something else: how long ``snapshot =
"fsfreeze"`` keeps the filesystem frozen per cycle. An ext4 made on the image (a loop
device) is mounted and protected with the block-layer tracker; each round writes
``--changes-mb`` MB of new files (1 MB each, fsynced, as a database would) and runs one
cycle. Printed: the freeze (the agent's snapshot hold) per cycle, median and max, with
the spool (``freeze_spool_mb``, what the cycle reads copied while frozen, sent after
the thaw) and without it (``freeze_spool_mb = 0``: frozen for the whole send), against
the target (100 ms); and its parts, medians from the agent's events: the kernel's
freeze (``cycle_frozen``), the copy into the spool (``cycle_spooled``) and the rest
(the trackers' cut, opening the disks, the thaw).

Several trackers and sizes in one run (``--tracker scan,reflink,blocktrace --size-mib
2048,16384``) run each tracker on each size one after another, each on a fresh image,
site and vault, and end with each tracker's p99 on the largest image over the smallest
and its bytes read over bytes written per cycle. ``--allocated`` makes the images fully
allocated (no holes, no zero blocks: every block is read by a scan, stored and tracked).

Run: ``.venv/bin/python benchmarks/bench_rpo.py [--size-mib N[,N...]] [--allocated]
[--seconds S] [--rate-mb S] [--tracker scan|reflink|blocktrace[,...]] [--freeze
[--changes-mb M] [--rounds R]] [--json]``. Not a test: nothing here runs under pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import resource
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lvguest
import uvloop
from bench_e2e import SiteRecovery, clean, quiet_logs, say
from diskgen import generate
from loopfs import cancelled_by_sigterm, loop_disk, xfs_folder
from rpofreeze import main_freeze

from mobility.agent import Agent
from mobility.snapshot import NoSnapshot

TARGET_P99_S = 10.0
WRITE = 64 * 1024


def churn(image: Path, rate: float, seconds: float, seed: int, done: threading.Event) -> int:
    """Random 64 KiB writes at ``rate`` bytes/s for ``seconds``; returns the writes made."""
    rng = random.Random(seed)
    with open(image, "rb") as f:  # a block device's st_size is 0
        blocks = f.seek(0, os.SEEK_END) // WRITE
    n = 0
    start = time.monotonic()
    with open(image, "r+b", buffering=0) as f:
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate / WRITE) + 1
            while n < due:
                f.seek(rng.randrange(blocks) * WRITE)
                f.write(rng.randbytes(WRITE))
                n += 1
            time.sleep(0.005)  # pacing the workload, not synchronising anything
    done.set()
    return n


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    cancelled_by_sigterm()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clean(work)
    if args.tracker == "reflink":
        size = args.size_mib << 20
        with xfs_folder(work, size + max(1 << 30, size // 2) + (512 << 20)) as folder:
            return await bench_on(args, work, folder / "disk.img")
    return await bench_on(args, work, work / "disk.img")


async def bench_on(args: argparse.Namespace, work: Path, image: Path) -> dict[str, Any]:
    what = "fully allocated " if args.allocated else ""
    say(f"generating a {what}{args.size_mib} MiB image (seed {args.seed})")
    generate(image, args.size_mib << 20, args.seed, zeros=not args.allocated)
    if args.tracker == "blocktrace":
        with loop_disk(work, image) as dev:
            return await bench_disk(args, work, dev)
    if args.tracker == "libvirt":
        with lvguest.guest(work, image) as g:
            return await bench_disk(args, work, g.image, g)
    return await bench_disk(args, work, image)


async def bench_disk(args: argparse.Namespace, work: Path, image: Path,
                     guest: lvguest.Guest | None = None) -> dict[str, Any]:
    sr = SiteRecovery(work, image, "reflink" if args.tracker == "reflink" else "none")
    await sr.start()
    assert sr.agent is not None and sr.e is not None
    if args.tracker == "reflink":
        assert sr.agent.trackers["sda"].kind == "reflink"
    elif args.tracker == "blocktrace":
        cfg = dataclasses.replace(sr.agent.cfg, snapshot="none", tracker="blocktrace")
        cfg.validate()
        sr.agent.close()
        sr.agent = Agent(cfg, provider=NoSnapshot())
    elif guest is not None:  # the domain's disk vda, read through pull-mode backups
        cfg = dataclasses.replace(
            sr.agent.cfg, snapshot="libvirt", tracker="libvirt", libvirt_uri=guest.uri,
            libvirt_domain=guest.name, libvirt_socket_dir=str(guest.socket_dir),
            disks=[{"name": "vda", "path": str(image)}])
        cfg.validate()
        sr.agent.close()
        sr.agent = Agent(cfg)
    else:
        sr.agent.provider = NoSnapshot()  # the writer never pauses: labelled honestly
    try:
        say("initial replication")
        await sr.cycle()
        available: list[tuple[float, float]] = [(time.time(), time.time())]
        waiters: list[asyncio.Task[None]] = []
        done = threading.Event()
        rate = args.rate_mb * 1e6
        say(f"churn: random 64 KiB writes at {args.rate_mb:g} MB/s for {args.seconds:g} s, "
            "cycles back to back")
        writer = asyncio.create_task(asyncio.to_thread(
            churn, image, rate, args.seconds, args.seed + 1, done) if guest is None else
            asyncio.to_thread(lvguest.churn, guest, rate, args.seconds, args.seed + 1, done))
        t_start = time.time()
        cpu_start = _cpu_seconds()
        cycles = 0
        reads: list[int] = []
        trackers: set[str] = set()

        async def whole(cycle: str, began: float) -> None:
            assert sr.e is not None
            await sr.e.proc.wait_point(cycle, timeout=3600)
            available.append((time.time(), began))

        while not done.is_set():
            began = time.time()
            r = await sr.agent.replicate_once()
            cycles += 1
            reads.append(r.bytes_read)
            trackers.update(r.tracking.values())
            waiters.append(asyncio.create_task(whole(r.cycle, began)))
            # Pacing the agent as interval_seconds would: not a synchronisation.
            if (pause := args.min_cycle_seconds - (time.time() - began)) > 0:
                await asyncio.sleep(pause)
        writes = await writer
        t_end = time.time()
        cpu = _cpu_seconds() - cpu_start
        await asyncio.gather(*waiters)
    finally:
        await sr.stop()
    ages = []
    t = t_start
    available.sort()
    while t <= t_end:
        newest = max(began for at, began in available if at <= t)
        ages.append(t - newest)
        t += 0.05
    res = {
        "image_bytes": args.size_mib << 20, "allocated": args.allocated,
        "seconds": args.seconds,
        "rate_mb_s": args.rate_mb, "writes": writes, "cycles": cycles,
        "min_cycle_seconds": args.min_cycle_seconds,
        "rpo_median_s": round(statistics.median(ages), 2),
        "rpo_p99_s": round(percentile(ages, 0.99), 2),
        "rpo_max_s": round(max(ages), 2), "target_p99_s": TARGET_P99_S,
        "cpus": os.cpu_count(), "tracker": args.tracker, "tracked_by": sorted(trackers),
        "read_per_cycle_median_bytes": int(statistics.median(reads)),
        "read_per_cycle_max_bytes": max(reads),
        # Random writes may hit the same block twice: an upper bound of what changed.
        "written_per_cycle_bytes": writes * WRITE // max(1, cycles),
        "process_cpu_s_per_min": round(cpu * 60 / (t_end - t_start), 1),
    }
    res["p99_vs_target"] = round(res["rpo_p99_s"] / TARGET_P99_S, 2)
    return res


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=_ints, default=[2048],
                    help="image size, or sizes separated by commas: each tracker runs on "
                         "each size, in one run (default 2048)")
    ap.add_argument("--allocated", action="store_true",
                    help="a fully allocated image: no holes and no zero blocks (diskgen "
                         "zeros=False), so every block is read, stored and tracked")
    ap.add_argument("--seconds", type=float, default=60.0, help="churn duration (default 60)")
    ap.add_argument("--rate-mb", type=float, default=10.0, help="churn MB/s (default 10)")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "work"),
                    help="working directory (default benchmarks/work/, git-ignored)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tracker", type=_trackers, default=["scan"],
                    help="how cycles find changes: scan (read everything, default), "
                         "reflink (image on an XFS loop device, root), blocktrace "
                         "(image on a loop device, tracefs, root) or libvirt (a qcow2 "
                         "image of a running domain, QEMU's dirty bitmaps; root, "
                         "libvirtd); several separated by commas run one after another in "
                         "one run")
    ap.add_argument("--min-cycle-seconds", type=float, default=0.0,
                    help="start a cycle at most this often (default 0: back to back); "
                         "with a tracker, cycles of a few milliseconds make more points "
                         "than the process server finishes")
    ap.add_argument("--freeze", action="store_true",
                    help="measure the fsfreeze hold per cycle instead (ext4 on a loop "
                         "device, blocktrace, root), with the spool and without")
    ap.add_argument("--changes-mb", type=int, default=10,
                    help="--freeze: MB of new files per cycle (default 10)")
    ap.add_argument("--rounds", type=int, default=10, help="--freeze: cycles (default 10)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.freeze and (len(args.size_mib) > 1 or args.tracker != ["scan"]):
        ap.error("--freeze takes one --size-mib and no --tracker")
    return args


TRACKERS = ("scan", "reflink", "blocktrace", "libvirt")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive: {text!r}")
    return values


def _trackers(text: str) -> list[str]:
    names = text.split(",")
    if bad := [n for n in names if n not in TRACKERS]:
        raise argparse.ArgumentTypeError(
            f"unknown tracker {bad[0]!r}: choose from {', '.join(TRACKERS)}")
    return names


def single(args: argparse.Namespace, tracker: str, size_mib: int) -> argparse.Namespace:
    """``args`` for one run: one tracker, one size."""
    one = argparse.Namespace(**vars(args))
    one.tracker, one.size_mib = tracker, size_mib
    return one


def render(res: dict[str, Any]) -> None:
    alloc = "fully allocated " if res["allocated"] else ""
    print(f"RPO under churn ({res['rate_mb_s']:g} MB/s of random 64 KiB writes for "
          f"{res['seconds']:g} s on a {alloc}{res['image_bytes'] >> 20} MiB image, "
          f"{res['cycles']} cycles):")
    print(f"  tracker {res['tracker']}: median {res['rpo_median_s']:.2f} s   "
          f"p99 {res['rpo_p99_s']:.2f} s   max {res['rpo_max_s']:.2f} s")
    print(f"  read per cycle: median {res['read_per_cycle_median_bytes'] / 1e6:.1f} MB, "
          f"max {res['read_per_cycle_max_bytes'] / 1e6:.1f} MB; written per cycle "
          f"{res['written_per_cycle_bytes'] / 1e6:.1f} MB; process CPU "
          f"{res['process_cpu_s_per_min']:.1f} s/min")
    print(f"  p99 / target ({TARGET_P99_S:g} s): {res['p99_vs_target']:.2f}x")


def compare(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per tracker run on several sizes: p99 of the largest over p99 of the smallest, and
    the largest ratio of bytes read to bytes written per cycle (medians)."""
    out: dict[str, dict[str, float]] = {}
    for tracker in dict.fromkeys(r["tracker"] for r in runs):
        mine = sorted((r for r in runs if r["tracker"] == tracker),
                      key=lambda r: r["image_bytes"])
        out[tracker] = {
            "p99_largest_over_smallest": round(
                mine[-1]["rpo_p99_s"] / max(mine[0]["rpo_p99_s"], 0.01), 2),
            "read_over_written_max": round(max(
                r["read_per_cycle_median_bytes"] / max(1, r["written_per_cycle_bytes"])
                for r in mine), 2)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    if args.freeze:
        args.size_mib = args.size_mib[0]
        return main_freeze(args)
    runs = []
    for size in args.size_mib:
        for tracker in args.tracker:
            one = single(args, tracker, size)
            try:
                res = uvloop.run(bench(one))
            finally:
                clean(Path(args.work).resolve())
            runs.append(res)
            if not args.json:
                render(res)
    ok = all(r["rpo_p99_s"] <= TARGET_P99_S for r in runs)
    if len(runs) == 1:
        if args.json:
            print(json.dumps(runs[0], indent=2))
        return 0 if ok else 1
    summary = compare(runs)
    if args.json:
        print(json.dumps({"runs": runs, "by_tracker": summary}, indent=2))
    else:
        for tracker, c in summary.items():
            print(f"{tracker}: p99 largest / smallest image {c['p99_largest_over_smallest']:.2f}x"
                  f", read / written per cycle at most {c['read_over_written_max']:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
