"""Reading every point manifest of a vault: what a retention round, a prune's mark, point
selection and ``points list`` do first.

``--points`` manifests (default 2 000) are put into a vault in a local folder, on a real
Azurite (started here, as the tests start it), and on the same Azurite behind the tests'
proxy holding every chunk ``--rtt-ms``/2 each way (a store a WAN round trip away, as a
process server in one site writing to a cloud region is); then ``Vault.scan_points``
reads them all: a fresh vault object's first scan, the same object's next scan with
nothing changed, and one after a point was added, ``--rounds`` times on each store (the
fastest of each is reported), the heap the object keeps for its next scans, and
``--burst`` fresh vault objects scanning at once (the drills of a plan's items) with a
cache each and with one between them (the configuration server's recovery jobs). Every
manifest read is opened (authenticated, parsed); their maps are never read.

Compare two trees by running the same script against each: ``PYTHONPATH=/path/to/tree
.venv/bin/python benchmarks/bench_manifests.py`` (the tree on ``PYTHONPATH`` is the
one measured).

Run: ``.venv/bin/python benchmarks/bench_manifests.py [--points N] [--rounds R]
[--rtt-ms MS] [--json]``.
Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # tests.backends (a tree on PYTHONPATH comes first)
os.environ.setdefault("SITERECOVERY_AZURITE",
                      str(REPO / ".cache/azurite/node_modules/.bin/azurite-blob"))

from tests.backends import azurite  # noqa: E402
from tests.test_resume import Proxy  # noqa: E402  (its ``delay``: a slow link)
from vault.keyslots import KeyMaterial  # noqa: E402
from vault.manifestcache import ManifestCache  # noqa: E402
from vault.point import DiskEntry, Point  # noqa: E402
from vault.repo import Vault  # noqa: E402
from vault.store.open import open_store  # noqa: E402

KEY = bytes(range(32))


def _point(i: int) -> Point:
    return Point(id=secrets.token_hex(32), machine=f"m{i % 20:02d}",
                 created=f"2026-12-{1 + i % 28:02d}T{i % 24:02d}:00:00.{i:06d}Z",
                 consistency="crash", cycle=secrets.token_hex(16), base=None, chain=0,
                 disks=[DiskEntry("sda", 1 << 34, 65536, secrets.token_hex(32), "full",
                                  secrets.token_hex(32))], format=3)


async def _fill(url: str, n: int) -> None:
    vault = await Vault.create(open_store(url), KeyMaterial(keyfile=KEY))
    try:
        for i in range(0, n, 64):
            await asyncio.gather(*(vault.put_point(_point(j))
                                   for j in range(i, min(n, i + 64))))
    finally:
        await vault.close()


async def _scan(url: str, n: int, rounds: int) -> dict[str, Any]:
    """Each round: a fresh vault object's first scan (every manifest read), then a second
    scan by the same object with nothing changed (a process server's next retention
    round), and a third after one more point was written. The heap the object keeps
    after its scans (the opened manifests), measured on the first round."""
    first: list[float] = []
    again: list[float] = []
    one_new: list[float] = []
    kept = 0
    for r in range(rounds):
        vault = await Vault.open(open_store(url), KeyMaterial(keyfile=KEY))
        try:
            for times, expect in ((first, n), (again, n)):
                if r == 0 and times is first:
                    tracemalloc.start()
                    before = tracemalloc.get_traced_memory()[0]
                t = time.perf_counter()
                scan = await vault.scan_points()
                times.append(time.perf_counter() - t)
                assert len(scan.points) == expect and not scan.damaged
                if r == 0 and times is first:
                    del scan
                    kept = tracemalloc.get_traced_memory()[0] - before
                    tracemalloc.stop()
            extra = _point(n + r)
            await vault.put_point(extra)
            t = time.perf_counter()
            scan = await vault.scan_points()
            one_new.append(time.perf_counter() - t)
            assert extra.id in {p.id for p in scan.points}
            await vault.store.delete(f"points/{extra.id}")
        finally:
            await vault.close()
    return {"first_s": first, "again_s": again, "one_new_s": one_new, "kept_bytes": kept}


async def _burst(url: str, n: int, objects: int, shared: bool) -> float:
    """``objects`` fresh vault objects scanning at once — the drills of a plan's items,
    each job with a vault object of its own — with a cache each or one between them
    (the configuration server's); the seconds until the last scan ends."""
    vaults = [await Vault.open(open_store(url), KeyMaterial(keyfile=KEY))
              for _ in range(objects)]
    if shared:
        cache = ManifestCache()
        for v in vaults:
            v.manifests = cache
    try:
        t = time.perf_counter()
        scans = await asyncio.gather(*(v.scan_points() for v in vaults))
        took = time.perf_counter() - t
        assert all(len(scan.points) == n for scan in scans)
    finally:
        for v in vaults:
            await v.close()
    return took


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rtt-ms", type=float, default=20.0,
                    help="the round trip of the 'azurite-wan' store (default 20)")
    ap.add_argument("--burst", type=int, default=8,
                    help="vault objects scanning at once (default 8: a plan's items)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {"points": args.points, "tree": os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="sr-manifests-") as tmp, \
            azurite(Path(tmp) / "azurite") as conn:
        port = int(conn.split("127.0.0.1:")[1].split("/")[0])
        async with Proxy(port) as link:  # every chunk held rtt/2 each way
            link.delay = args.rtt_ms / 2000
            wan = conn.replace(f"127.0.0.1:{port}", f"127.0.0.1:{link.port}")
            stores = {"local": (f"file://{tmp}/vault", ""), "azurite": ("azure://lan", conn),
                      "azurite-wan": ("azure://wan", wan)}
            for name, (url, connection) in stores.items():
                os.environ["SITERECOVERY_AZURE_CONNECTION_STRING"] = connection
                await _fill(url, args.points)
                got = await _scan(url, args.points, args.rounds)
                for key, shared in (("burst_own_s", False), ("burst_shared_s", True)):
                    got[key] = [await _burst(url, args.points, args.burst, shared)
                                for _ in range(args.rounds)]
                out[name] = {k: (round(min(v), 3) if isinstance(v, list) else v)
                             for k, v in got.items()}
    if args.json:
        print(json.dumps(out))
    else:
        for name in ("local", "azurite", "azurite-wan"):
            r = out[name]
            print(f"{name:11} {args.points} manifests, best of {args.rounds}: first scan "
                  f"{r['first_s']:.3f} s, again {r['again_s']:.3f} s, after one new point "
                  f"{r['one_new_s']:.3f} s; heap kept {r['kept_bytes'] / 1e6:.1f} MB; "
                  f"{args.burst} objects at once, a cache each {r['burst_own_s']:.3f} s, "
                  f"one cache {r['burst_shared_s']:.3f} s")


if __name__ == "__main__":
    asyncio.run(main())
