"""Memory against vault size: peak RSS and time of the steps that open a vault's index.

A synthetic vault of ``--blocks`` distinct blocks is built once, through the vault's own
writer (``CycleWriter``: hashed, sealed into packs, indexed, mapped, with a point per
100 000 blocks), and kept in ``--vault-dir`` for later runs. Its blocks are 4 KiB of a
counter and zeros: distinct and small, since it is their count that the index grows
with (they compress to a few bytes, so a million blocks take about 100 MB of packs).

Each step then runs in a child process of its own, which reports its wall time and its
own peak RSS (``VmHWM``):

- ``ingest``: the process server's path: ``VaultAccess.open`` (vault and index), then a
  new disk of ``--ingest-mib`` (default 256; the README's figures use 2048) of distinct
  64 KiB blocks deduplicated against the index and written as a point (``CycleWriter``),
  as an uploader cycle does;
- ``restore``: ``restore_point`` of that point;
- ``basis``: the resync basis of that point as the process server serves it
  (``VaultAccess.open``, then ``vault.fpstream.fingerprint_ranges``: the disk's
  fingerprints a range at a time, checked against the point's digest);
- ``check``: ``check_vault`` (no data read); ``checkdata``: with ``--read-data --subset
  1%`` (not run unless named in ``--steps``);
- ``prune``: ``prune`` with a retention that keeps every point: the mark over every map,
  the index loaded, one consolidated index written (a dry run stops before the index);
- ``rebuild``: ``rebuild_index`` (rewrites the index objects from pack trailers);
- ``verify``: the configuration server's verification of recovery points
  (``configserver.verification.verify_points``) of every point of the vault: each block
  read and authenticated, each disk's digest checked (not run unless named);
- ``check-stream``, ``checkdata-stream``, ``prune-stream``, ``rebuild-stream``,
  ``verify-stream``: the
  same within a budget of ``--memory-mib`` (default 256): the streaming paths (the
  prune's index a ``DiskIndex`` built in a temporary directory, as with no
  ``--index-dir``), in the same run as the in-memory ones.

``--index-dir DIR`` (and ``--index-memory-mib``) runs the ingest and restore with the
on-disk index (vault/indexdb.py) instead of the in-memory one.

Run: ``.venv/bin/python benchmarks/bench_memory.py [--blocks N] [--vault-dir DIR]
[--steps ingest,restore,check,...] [--memory-mib M] [--json]``. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_e2e import quiet_logs, say

from common.digest import DiskDigest, fingerprint
from common.labels import CRASH
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile
from vault.repo import Vault
from vault.store.local import LocalStore
from vault.writer import CycleWriter, DiskSpec

STEPS = ("ingest", "restore", "basis", "check", "check-stream", "checkdata",
         "checkdata-stream", "prune", "prune-stream", "rebuild", "rebuild-stream", "verify",
         "verify-stream")
DEFAULT_STEPS = tuple(s for s in STEPS if not s.startswith(("checkdata", "verify")))
POINT_BLOCKS = 100_000
SMALL = 4096
BS = 64 * 1024
INGEST_MIB = 256
BATCH = 64  # blocks handed to the writer at once (4 MiB), as the uploader's runs


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def km_of(vdir: Path) -> KeyMaterial:
    return KeyMaterial(keyfile=read_keyfile(str(vdir / "vault.key")))


async def build(vdir: Path, nblocks: int) -> dict[str, Any]:
    """Write ``nblocks`` distinct small blocks into a new vault in ``vdir``."""
    from vault.index import Index

    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    km = KeyMaterial(keyfile=new_keyfile(str(vdir / "vault.key")))
    vault = await Vault.create(LocalStore(vdir / "vault"), km)
    t0 = time.monotonic()
    zeros = bytes(SMALL - 8)
    with ThreadPoolExecutor(2) as ex:
        done, cycle = 0, 0
        while done < nblocks:
            count = min(POINT_BLOCKS, nblocks - done)
            w = CycleWriter(vault, Index(), ex, machine="bench-build", cycle=f"c{cycle:06d}",
                            disks=[DiskSpec("d0", count * BS, BS)], full=True, base=None)
            digest = DiskDigest()
            for lo in range(0, count, 1024):
                items: list[tuple[int, int, bytes | memoryview | None]] = []
                for n in range(lo, min(lo + 1024, count)):
                    data = struct.pack("<Q", done + n + 1) + zeros
                    items.append((0, n, data))
                    digest.update(fingerprint(data))
                await w.add(items)
            await w.finish({"d0": digest.hexdigest()}, CRASH)
            done += count
            cycle += 1
            say(f"built {done} / {nblocks} blocks ({time.monotonic() - t0:.0f} s)")
    await vault.close()
    info = {"blocks": nblocks, "points": cycle, "build_seconds": round(time.monotonic() - t0, 1),
            "vault_bytes": tree_bytes(vdir / "vault")}
    (vdir / "built.json").write_text(json.dumps(info))
    return info


# -- the steps, each in a child process ---------------------------------------------------
def index_args(args: argparse.Namespace) -> dict[str, Any]:
    """With ``--index-dir``: the on-disk index's arguments (else the in-memory index)."""
    if not args.index_dir:
        return {}
    return {"index_dir": args.index_dir, "index_memory": args.index_memory_mib << 20}


async def step_ingest(vdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from procserver.vaultaccess import VaultAccess

    kw = index_args(args)
    va = VaultAccess(LocalStore(vdir / "vault"), km_of(vdir), **kw)
    t0 = time.monotonic()
    await va.open()
    opened = time.monotonic() - t0
    vault = va.vault
    seed = int(time.time_ns())
    cycle = f"i{seed}"
    digest = DiskDigest()
    size = args.ingest_mib << 20
    with ThreadPoolExecutor(2) as ex:
        w = CycleWriter(vault, await va.refresh_index(), ex, machine="bench-ingest",
                        cycle=cycle, disks=[DiskSpec("d0", size, BS)], full=True,
                        base=None)
        nblocks = size // BS
        for lo in range(0, nblocks, BATCH):
            items: list[tuple[int, int, bytes | memoryview | None]] = []
            for n in range(lo, lo + BATCH):
                data = os.urandom(BS)
                items.append((0, n, data))
                digest.update(fingerprint(data))
            await w.add(items)
        point = await w.finish({"d0": digest.hexdigest()}, CRASH)
    await va.close()
    (vdir / "last_ingest").write_text(point.id)
    return {"open_seconds": round(opened, 2)}


async def step_restore(vdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from vault.restore import restore_point

    vault = await Vault.open(LocalStore(vdir / "vault"), km_of(vdir))
    point = await vault.read_point((vdir / "last_ingest").read_text())
    kw = index_args(args)
    with tempfile.TemporaryDirectory(dir=vdir) as out:
        await restore_point(vault, point, out, **kw)
    await vault.close()
    return {}


async def step_basis(vdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from procserver.vaultaccess import VaultAccess
    from vault.fpstream import fingerprint_ranges

    kw = index_args(args)
    va = VaultAccess(LocalStore(vdir / "vault"), km_of(vdir), **kw)
    t0 = time.monotonic()
    await va.open()
    opened = time.monotonic() - t0
    point = await va.vault.read_point((vdir / "last_ingest").read_text())
    sent = 0
    with ThreadPoolExecutor(2) as ex:
        index = await va.refresh_index()
        async for _first, fps in fingerprint_ranges(va.vault, point, "d0", index=index,
                                                    executor=ex):
            sent += len(fps)
    await va.close()
    return {"open_seconds": round(opened, 2), "fingerprint_bytes": sent}


def budget(args: argparse.Namespace) -> int | None:
    """The memory budget of a ``-stream`` step; None (in memory) for the others."""
    return args.memory_mib << 20 if args.child.endswith("-stream") else None


async def step_check(vdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from vault.check import check_vault

    data = args.child.startswith("checkdata")
    with ThreadPoolExecutor(2) as ex:
        report = await check_vault(LocalStore(vdir / "vault"), km_of(vdir), read_data=data,
                                   subset=1.0 if data else None, executor=ex,
                                   memory=budget(args), temp_dir=vdir)
    kinds: dict[str, int] = {}
    for pr in report.problems:
        kinds[pr.kind] = kinds.get(pr.kind, 0) + 1
    return {"errors": len(report.errors), "warnings": len(report.warnings), "kinds": kinds}


async def step_prune(vdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from vault.prune import prune
    from vault.retention import Retention

    vault = await Vault.open(LocalStore(vdir / "vault"), km_of(vdir))
    keep = Retention(1e6, 1e6, 1e6, 1e6)
    with ThreadPoolExecutor(2) as ex:
        await prune(vault, keep, ex, memory=budget(args), temp_dir=vdir)
    await vault.close()
    return {}


async def step_rebuild(vdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from vault.rebuild import rebuild_index

    vault = await Vault.open(LocalStore(vdir / "vault"), km_of(vdir))
    report = await rebuild_index(vault, memory=budget(args))
    await vault.close()
    return {"packs": report.packs_indexed}


async def step_verify(vdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import inspect

    from configserver.verification import verify_points

    vault = await Vault.open(LocalStore(vdir / "vault"), km_of(vdir))
    points = await vault.list_points()
    kw: dict[str, Any] = {}
    if "memory" in inspect.signature(verify_points).parameters:
        kw = {"memory": budget(args), "temp_dir": vdir}
    elif budget(args) is not None:  # a tree from before the budget (for before/after runs)
        raise SystemExit("this tree's verify_points takes no memory budget")
    with ThreadPoolExecutor(2) as ex:
        results = await verify_points(vault, points, ex, clock=time.time, **kw)
    await vault.close()
    return {"points": len(results), "failed": sum(1 for r in results if not r.ok)}


STEP_FNS = {"ingest": step_ingest, "restore": step_restore, "basis": step_basis,
            "check": step_check,
            "check-stream": step_check, "checkdata": step_check,
            "checkdata-stream": step_check, "prune": step_prune, "prune-stream": step_prune,
            "rebuild": step_rebuild, "rebuild-stream": step_rebuild,
            "verify": step_verify, "verify-stream": step_verify}


def child(args: argparse.Namespace) -> None:
    quiet_logs()
    vdir = Path(args.vault_dir)
    t0 = time.monotonic()
    extra = asyncio.run(STEP_FNS[args.child](vdir, args))
    print(json.dumps({"step": args.child, "seconds": round(time.monotonic() - t0, 2),
                      "peak_rss": vm_hwm(), **extra}))


def run_step(step: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", step, "--vault-dir", args.vault_dir,
           "--memory-mib", str(args.memory_mib), "--ingest-mib", str(args.ingest_mib)]
    if args.index_dir:
        cmd += ["--index-dir", args.index_dir, "--index-memory-mib", str(args.index_memory_mib)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=1_000_000,
                    help="distinct blocks in the synthetic vault (default 1000000)")
    ap.add_argument("--vault-dir", help="where the vault is built and kept (default "
                    "benchmarks/work/memory-<blocks>)")
    ap.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                    help=f"comma-separated steps, from {', '.join(STEPS)} (default: all but "
                         "checkdata, verify and their -stream)")
    ap.add_argument("--memory-mib", type=int, default=256,
                    help="the budget of the -stream steps (default 256)")
    ap.add_argument("--ingest-mib", type=int, default=INGEST_MIB,
                    help=f"size of the new disk the ingest step writes (default {INGEST_MIB})")
    ap.add_argument("--index-dir", help="use the on-disk index kept in this directory")
    ap.add_argument("--index-memory-mib", type=int, default=0,
                    help="with --index-dir: the in-memory index is used below this estimate")
    ap.add_argument("--rebuild-vault", action="store_true", help="build the vault anew")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vault_dir is None:
        args.vault_dir = str(Path(__file__).parent / "work" / f"memory-{args.blocks}")
    if args.child:
        child(args)
        return
    quiet_logs()
    vdir = Path(args.vault_dir)
    built = vdir / "built.json"
    info = json.loads(built.read_text()) if built.exists() else None
    if args.rebuild_vault or info is None or info["blocks"] != args.blocks:
        say(f"building a vault of {args.blocks} blocks in {vdir}")
        info = asyncio.run(build(vdir, args.blocks))
    steps = [s for s in STEPS if s in args.steps.split(",")]
    if ({"restore", "basis"} & set(steps) and "ingest" not in steps
            and not (vdir / "last_ingest").exists()):
        steps.insert(0, "ingest")
    results = []
    for s in steps:
        say(f"step {s}")
        results.append(run_step(s, args))
    doc = {"vault": info, "index_dir": args.index_dir, "memory_mib": args.memory_mib,
           "steps": results}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"vault: {info['blocks']} blocks, {info['points']} points, "
          f"{info['vault_bytes'] / 1e6:.0f} MB, built in {info['build_seconds']} s")
    print(f"{'step':<18}{'seconds':>10}{'peak RSS MiB':>14}")
    for r in results:
        print(f"{r['step']:<18}{r['seconds']:>10.2f}{r['peak_rss'] / 2**20:>14.0f}")


if __name__ == "__main__":
    main()
