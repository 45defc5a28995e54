"""Randomized fault runs against a real configuration server, process server and agent,
then the proof.

The site is real and managed: a configuration server (``siterecovery configserver run``,
its own process, a SQLite catalog in its data directory), a process server registered
with it (``siterecovery procserver run``: heartbeats, point reports through its outbox,
the policies' retention) with a certificate from its CA, and a machine enrolled with the
passphrase and its replication enabled. Each run changes a seeded share of the disk and
starts one round of the managed agent (``benchmarks/chaosagent.py``, its own process:
settings, heartbeat, one cycle and its progress reports) through a TCP proxy to the
process server, and at a random moment injects one fault:

- ``kill_procserver``: ``kill -9`` of the process server, restarted on the same data
  directory (it resumes its uploads from its cache);
- ``kill_configserver``: ``kill -9`` of the configuration server, started again 0-1 s
  later on the same catalog and ports (the agent replicates on mobility.toml meanwhile;
  the process server's reports wait in its outbox);
- ``kill_agent``: ``kill -9`` of the agent in the middle of its cycle;
- ``reset``: the proxy resets every connection between agent and process server;
- ``storage_outage``: the vault's folder is replaced by a file for 0.2-2 s (every
  store call fails; uploads retry);
- ``none``: the cycle runs undisturbed.

A cycle is *acknowledged* when the agent printed its result (it got the ACK). After the
last run a clean cycle is taken and every acknowledged cycle is waited for in the vault.
The proof: every acknowledged cycle is a point that restores byte-exact to the disk as it
was when that cycle ran; every other point restores to some state the disk had; every
point in the vault is in the configuration server's catalog. Prints runs, faults of each
kind, points verified, points missing from the catalog and bytes lost (the disk size for
each acknowledged cycle without a byte-exact point: must be 0). Exit status 1 otherwise.

Run: ``.venv/bin/python benchmarks/chaos.py [--runs 1000] [--seed 1] [--size-mib 8]
[--work DIR] [--json]``. Not a test: nothing here runs under pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chaossite import ChaosSite
from diskgen import generate, sha256_file

from vault.keyslots import KeyMaterial
from vault.materialize import materialize
from vault.repo import Vault
from vault.store.local import LocalStore

FAULTS = ("kill_procserver", "kill_configserver", "kill_agent", "reset", "storage_outage",
          "none")
BLOCK = 64 << 10


def say(msg: str) -> None:
    print(f"chaos: {msg}", file=sys.stderr, flush=True)


def mutate(path: Path, rng: random.Random) -> None:
    """Overwrite a random share (1-30 %) of the blocks with random bytes or zeros."""
    n = path.stat().st_size // BLOCK
    with open(path, "r+b") as f:
        for b in rng.sample(range(n), max(1, int(n * rng.uniform(0.01, 0.3)))):
            f.seek(b * BLOCK)
            f.write(bytes(BLOCK) if rng.random() < 0.1 else rng.randbytes(BLOCK))


async def agent_cycle(config: Path, fault: str, delay: float, site: ChaosSite,
                      rng: random.Random) -> str | None:
    """One agent round with ``fault`` after ``delay`` seconds; its cycle id if it was
    acknowledged."""
    agent = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("chaosagent.py")), str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    done = asyncio.create_task(agent.communicate())
    finished, _ = await asyncio.wait([done], timeout=delay)
    if not finished and fault == "kill_agent":
        agent.send_signal(signal.SIGKILL)
    elif not finished and fault == "kill_procserver":
        await site.ps.kill9()
        site.proxy.target = int((await site.ps.start())["port"])
    elif not finished and fault == "reset":
        site.proxy.reset()
    if fault == "kill_configserver":  # at any moment, the agent's cycle over or not
        await site.cs.kill9()
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        await site.cs.start()
    if fault == "storage_outage":
        # A file in the folder's place: every read and write of the store fails.
        away = site.vault_dir.with_name(site.vault_dir.name + ".away")
        site.vault_dir.rename(away)
        site.vault_dir.write_bytes(b"")
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        site.vault_dir.unlink()
        away.rename(site.vault_dir)
    out, _err = await done
    if agent.returncode != 0:
        return None
    try:
        return str(json.loads(out.decode().strip().splitlines()[-1])["cycle"])
    except (ValueError, KeyError, IndexError):
        return None


async def chaos(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    root = Path(args.work).resolve() / "chaos"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    disk = root / "disk.img"
    generate(disk, args.size_mib << 20, args.seed)
    site = await ChaosSite.build(root, disk)
    faults: Counter[str] = Counter()
    attempted: set[str] = set()
    acked: dict[str, str] = {}
    started = time.monotonic()
    try:
        for run in range(args.runs + 1):
            last = run == args.runs
            fault = "none" if last else rng.choice(FAULTS)
            if run:
                mutate(disk, rng)
            state = sha256_file(disk)
            attempted.add(state)
            cycle = await agent_cycle(site.agent_config, fault, rng.uniform(0.05, 2.0), site,
                                      rng)
            if not last:
                faults[fault] += 1
            if cycle is not None:
                acked[cycle] = state
            if (run + 1) % 25 == 0:
                say(f"{run + 1} runs, {len(acked)} acknowledged, {dict(faults)}")
        say("waiting for every acknowledged cycle to be a point, and in the catalog")
        ps = site.ps
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.drain_seconds):
                # The vault is the truth: a process server killed after a point's
                # upload and before its log line never logs it.
                while True:
                    ps.changed.clear()  # before the look: an upload during it wakes
                    if not set(acked) - set((await site.vault_points()).values()):
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(10):
                            await ps.changed.wait()
                await site.catalog_has(set(await site.vault_points()))
        cataloged, item_state = await site.catalog(), await site.item_state()
    finally:
        await site.close()
    res = await prove(root, site.key, acked, attempted, faults, args,
                      time.monotonic() - started)
    ids = set(res.pop("ids"))
    return {**res, "points_not_in_catalog": len(ids - cataloged),
            "item_state": item_state}


async def prove(root: Path, key: Path, acked: dict[str, str], attempted: set[str],
                faults: Counter[str], args: argparse.Namespace, seconds: float
                ) -> dict[str, Any]:
    from vault.keyslots import read_keyfile

    vault = await Vault.open(LocalStore(root / "vault"), KeyMaterial(keyfile=read_keyfile(key)))
    try:
        points = await vault.list_points("chaos01")
        index = await vault.load_index()
        by_cycle = {p.cycle: p for p in points}
        verified, wrong, lost = 0, 0, 0
        out = root / "restored.img"
        for p in points:
            await materialize(vault, p, "sda", str(out), index=index)
            got = sha256_file(out)
            out.unlink()
            ok = got == acked[p.cycle] if p.cycle in acked else got in attempted
            verified += ok
            wrong += not ok
        for cycle in acked:
            if cycle not in by_cycle:
                lost += args.size_mib << 20
    finally:
        await vault.close()
    return {"runs": args.runs, "faults": dict(sorted(faults.items())),
            "acknowledged_cycles": len(acked), "points": len(points),
            "points_verified": verified, "points_wrong": wrong, "bytes_lost": lost,
            "seconds": round(seconds, 1), "seed": args.seed, "size_mib": args.size_mib,
            "ids": [p.id for p in points]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=1000, help="fault runs (default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size-mib", type=int, default=8, help="the disk's size (default 8)")
    ap.add_argument("--drain-seconds", type=float, default=900.0,
                    help="how long to wait for the last uploads (default 900)")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "work"))
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = asyncio.run(chaos(args))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:20} {v}")
    ok = res["bytes_lost"] == 0 and res["points_wrong"] == 0
    return 0 if ok and res["points_not_in_catalog"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
