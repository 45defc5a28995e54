"""Failback and re-protect after 2 % change, against the full copies they avoid.

On one seeded image (``diskgen.py``, 2 GiB by default), all in one process:

1. initial     the agent's initial cycle through a real process server into a
               local-folder vault (mutual TLS, fsynced cache, packs), until the
               point is whole: the full copy, for scale.
2. reprotect   the recovered machine's image (a copy of the image, then 2 % of its
               blocks overwritten) into the vault as a delta on the point
               (``vault/imagepoint.py``), against the same image stored whole
               (no base).
3. failback    the original image (2 % overwritten otherwise: it went on a little
               before it stopped) gets the recovered machine's point written back by
               its agent (``mobility/inplace.py``: compare, fetch only what
               differs, verify), against a full restore of that point to a raw image.

Every result is checked by sha256 (not timed). Run: ``.venv/bin/python
benchmarks/bench_failback.py [--size-mib 2048] [--work DIR] [--json]``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvloop

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the PKI and server helpers come from the tests' helpers
    sys.path.insert(0, str(REPO))

from bench_e2e import quiet_logs, say  # noqa: E402
from diskgen import generate, mutate, sha256_file  # noqa: E402

from mobility.inplace import failback  # noqa: E402
from tests.helpers import (  # noqa: E402
    agent_config,
    make_agent,
    make_pki,
    make_vault,
    open_vault,
    proc_config,
    running_procserver,
)
from vault.imagepoint import ImageDisk, point_from_images  # noqa: E402
from vault.restore import restore_point  # noqa: E402

CHANGE = 0.02


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = args.size_mib << 20
    image, recovered = work / "original.img", work / "recovered.img"
    say(f"generating a {args.size_mib} MiB image")
    generate(image, size, seed=1)
    out: dict[str, Any] = {"size_bytes": size, "change": CHANGE}
    pki = make_pki(work / "pki")
    url, key = await make_vault(work)
    async with running_procserver(proc_config(work, pki, url, key)) as ps:
        agent = make_agent(agent_config(work, pki, "bench-vm", ps.port, {"sda": image}))
        try:
            t = time.monotonic()
            r = await agent.replicate_once()
            first = await ps.wait_point(r.cycle, timeout=3600)
            out["initial"] = {"seconds": round(time.monotonic() - t, 2),
                              "bytes_sent": r.bytes_sent}
            say(f"initial copy: {out['initial']}")

            shutil.copyfile(image, recovered)
            mutate(recovered, CHANGE, seed=2)
            vault = await open_vault(work / "vault", key)
            try:
                base = await vault.read_point(first)
                disks = [ImageDisk("sda", str(recovered))]
                with ThreadPoolExecutor(2) as ex:
                    # The delta first: its new blocks are packed by it, not by the full one.
                    t = time.monotonic()
                    delta = await point_from_images(vault, ex, machine="bench-vm",
                                                    cycle="reprotect", disks=disks,
                                                    block_size=base.disks[0].block_size,
                                                    base=base)
                    delta_s = time.monotonic() - t
                    t = time.monotonic()
                    full = await point_from_images(vault, ex, machine="bench-full",
                                                   cycle="full", disks=disks,
                                                   block_size=base.disks[0].block_size,
                                                   base=None)
                    full_s = time.monotonic() - t
                bs = base.disks[0].block_size
                out["reprotect"] = {
                    "seconds": round(delta_s, 2), "blocks_stored": delta.blocks_stored,
                    "bytes_stored": delta.blocks_stored * bs,
                    # its blocks are in the vault already (deduplicated): the time of
                    # a real full copy is the initial copy's
                    "full_copy": {"seconds_deduplicated": round(full_s, 2),
                                  "blocks_stored": full.blocks_stored,
                                  "bytes_stored": full.blocks_stored * bs}}
                say(f"re-protect: {out['reprotect']}")
                t = time.monotonic()
                restored = await restore_point(vault, delta.point, work / "restored")
                restore_s = time.monotonic() - t
            finally:
                await vault.close()

            mutate(image, CHANGE / 4, seed=3)  # the original went on a little
            t = time.monotonic()
            fb = await failback(agent, delta.point.id)
            fb_s = time.monotonic() - t
            out["failback"] = {
                "seconds": round(fb_s, 2), "blocks_compared": fb.disks[0].blocks_compared,
                "blocks_written": fb.blocks_written, "bytes_written": fb.bytes_written,
                "full_restore": {"seconds": round(restore_s, 2), "bytes_written": size}}
            say(f"failback: {out['failback']}")
        finally:
            agent.close()
    want = sha256_file(recovered)
    out["verified"] = sha256_file(image) == want == sha256_file(restored[0].path)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=2048)
    p.add_argument("--work", default=str(Path(__file__).parent / "work-failback"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    quiet_logs()
    out = uvloop.run(bench(args))
    print(json.dumps(out, indent=2) if args.json else out)
    return 0 if out["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
