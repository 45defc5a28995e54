"""Reading every point manifest of a vault: what a retention round, a prune's mark, point
selection and ``points list`` do first.

``--points`` manifests (default 2 000) are put into a vault in a local folder, on a real
Azurite (started here, as the tests start it), and on the same Azurite behind the tests'
proxy holding every chunk ``--rtt-ms``/2 each way (a store a WAN round trip away, as a
process server in one site writing to a cloud region is); then ``Vault.scan_points``
reads them all, ``--rounds`` times on each store, and the fastest round is reported. Every
manifest is opened (authenticated, parsed); their maps are never read.

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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # tests.backends (a tree on PYTHONPATH comes first)
os.environ.setdefault("SITERECOVERY_AZURITE",
                      str(REPO / ".cache/azurite/node_modules/.bin/azurite-blob"))

from tests.backends import azurite  # noqa: E402
from tests.test_resume import Proxy  # noqa: E402  (its ``delay``: a slow link)
from vault.keyslots import KeyMaterial  # noqa: E402
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


async def _scan(url: str, n: int, rounds: int) -> list[float]:
    vault = await Vault.open(open_store(url), KeyMaterial(keyfile=KEY))
    times = []
    try:
        for _ in range(rounds):
            t = time.perf_counter()
            scan = await vault.scan_points()
            times.append(time.perf_counter() - t)
            assert len(scan.points) == n and not scan.damaged
    finally:
        await vault.close()
    return times


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rtt-ms", type=float, default=20.0,
                    help="the round trip of the 'azurite-wan' store (default 20)")
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
                times = await _scan(url, args.points, args.rounds)
                out[name] = {"best_s": round(min(times), 3),
                             "rounds_s": [round(t, 3) for t in times]}
    if args.json:
        print(json.dumps(out))
    else:
        for name in ("local", "azurite", "azurite-wan"):
            r = out[name]
            print(f"{name:11} {args.points} manifests: best {r['best_s']:.3f} s "
                  f"(rounds {', '.join(f'{t:.3f}' for t in r['rounds_s'])})")


if __name__ == "__main__":
    asyncio.run(main())
