"""One disk's map, whole (format 1) and in chunks (format 2): what a reader holds and how
long it takes, on a map as large as a fully written big disk.

A full map of ``--entries`` entries (default 4 194 304: a 256 GiB disk of 64 KiB blocks,
every block written; 168 MB of plaintext) is written once into a local-folder vault in
``--work``, both ways: sealed whole (format 1) and in chunks of 65 536 entries (format 2).
Each step then runs in a child process of its own, which reports its wall time and its
peak RSS (``VmHWM``), for each format in the same run:

- ``open``: the map opened (format 1: read and authenticated whole; format 2: its table);
- ``walk``: opened, then gone through in ranges of 65 536 blocks (``ChainRanges``: what a
  restore, a check, a prune's mark, a resync basis and a verification do), every entry
  checked;
- ``lookup``: opened, then 100 FETCH-sized lookups (``MapChain.lookup``) of 64 blocks
  each at random places of the disk, as a failback's FETCHes ask.

Run: ``.venv/bin/python benchmarks/bench_maps.py [--entries N] [--steps open,walk,lookup]
[--json]``. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vault import names
from vault.keyslots import KeyMaterial
from vault.mapchain import MapChain
from vault.mapchunks import open_chunked, seal_chunked
from vault.mapranges import ChainRanges
from vault.maps import ENTRY, FULL, MapView, open_map_entries, seal_map_plaintext
from vault.maps import HEAD as MAP_HEAD
from vault.repo import Vault
from vault.store.local import LocalStore

STEPS = ("open", "walk", "lookup")
BS = 64 * 1024
KEY = bytes(range(32))
SPAN = 1 << 16
LOOKUPS, PER_LOOKUP = 100, 64


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def build(work: Path, entries: int) -> dict[str, Any]:
    """The same full map written whole and in chunks; its ids and sizes."""
    import shutil

    if work.exists():
        shutil.rmtree(work)
    v = await Vault.create(LocalStore(work / "vault"), KeyMaterial(keyfile=KEY))
    try:
        rng = random.Random(1)
        body = bytearray(entries * ENTRY.size)
        for n in range(entries):
            ENTRY.pack_into(body, n * ENTRY.size, n, rng.randbytes(32))
        plain = MAP_HEAD.pack(FULL, entries * BS, BS, entries) + body
        whole, chunked = names.random_id(), names.random_id()
        await v.store.put(names.MAPS + whole, seal_map_plaintext(v.keyring, whole, plain))
        await v.store.put(names.MAPS + chunked, seal_chunked(v.keyring, chunked, FULL,
                                                             entries * BS, BS, memoryview(body)))
    finally:
        await v.close()
    info = {"entries": entries, "plaintext_bytes": len(plain), "format1": whole,
            "format2": chunked}
    (work / "built.json").write_text(json.dumps(info))
    return info


async def _open(v: Vault, fmt: int, map_id: str) -> MapView:
    if fmt == 1:
        return open_map_entries(v.keyring, map_id, await v.store.get(names.MAPS + map_id))
    return await open_chunked(v.store, v.keyring, map_id)


async def step(work: Path, name: str, fmt: int) -> dict[str, Any]:
    info = json.loads((work / "built.json").read_text())
    v = await Vault.open(LocalStore(work / "vault"), KeyMaterial(keyfile=KEY))
    try:
        t0 = time.monotonic()
        m = await _open(v, fmt, info[f"format{fmt}"])
        out: dict[str, Any] = {}
        if name == "walk":
            seen = 0
            async for _first, _end, blocks in ChainRanges([m], info["entries"]).walk(SPAN):
                seen += len(blocks)
            assert seen == info["entries"]
        elif name == "lookup":
            chain = MapChain([m])
            rng = random.Random(2)
            found = 0
            for _ in range(LOOKUPS):
                start = rng.randrange(info["entries"] - PER_LOOKUP)
                found += len(await chain.lookup(range(start, start + PER_LOOKUP)))
            assert found == LOOKUPS * PER_LOOKUP
        out["seconds"] = round(time.monotonic() - t0, 3)
        return out
    finally:
        await v.close()


def child(args: argparse.Namespace) -> None:
    res = asyncio.run(step(Path(args.work), args.child, args.format))
    print(json.dumps({"step": args.child, "format": args.format, "peak_rss": vm_hwm(),
                      **res}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=1 << 22,
                    help="entries of the map (default 4194304: 256 GiB of 64 KiB blocks)")
    ap.add_argument("--work", default=str(Path(__file__).parent / "work" / "maps"),
                    help="where the vault is kept (default benchmarks/work/maps)")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated, from "
                                                             f"{', '.join(STEPS)}")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--format", type=int, choices=(1, 2), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child:
        child(args)
        return
    built = work / "built.json"
    info = json.loads(built.read_text()) if built.exists() else None
    if info is None or info["entries"] != args.entries:
        print(f"bench: writing a map of {args.entries} entries both ways", file=sys.stderr)
        info = asyncio.run(build(work, args.entries))
    results = []
    for name in (s for s in STEPS if s in args.steps.split(",")):
        for fmt in (1, 2):
            cmd = [sys.executable, __file__, "--child", name, "--format", str(fmt),
                   "--work", str(work)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps({"map": info, "steps": results}, indent=2))
        return
    print(f"map: {info['entries']} entries, {info['plaintext_bytes'] / 1e6:.0f} MB of "
          "plaintext")
    print("| step | format 1 (whole): s | peak RSS | format 2 (chunks): s | peak RSS |")
    print("|---|---|---|---|---|")
    for name in STEPS:
        rows = {r["format"]: r for r in results if r["step"] == name}
        if rows:
            a, b = rows[1], rows[2]
            print(f"| {name} | {a['seconds']} | {a['peak_rss'] >> 20} MiB | {b['seconds']} | "
                  f"{b['peak_rss'] >> 20} MiB |")


if __name__ == "__main__":
    main()
