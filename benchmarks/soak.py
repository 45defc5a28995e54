"""Soak: agents churning their disks for a long time through one process server, with
prune and verification running; RSS over time, RPO, verification failures.

One process server runs as its own daemon (``siterecovery procserver run``); the agents
run in this process (``mobility.agent.Agent``), each on its own seeded image. Every
``--interval`` seconds each agent overwrites ``--churn-mb-s`` times ``--interval`` bytes of its disk
in random blocks of the replication block size (``--block-kib``, 64 KiB as the agent's
default) and replicates a cycle. Every ``--prune-minutes`` a prune (under
the vault's exclusive lock, keeping the last ``--keep-minutes``) runs while the agents go
on; every ``--verify-minutes`` each point uploaded since the last verification is
restored and compared with the digest of the disk when its cycle ran (a failed
verification is a point that does not restore byte-exact) — or, with ``--verify-sample
N``, N points of each machine in each ``--verify-minutes``: only the cycles to be
verified take the disk's digest (restoring, or even hashing, every point of 8 agents at
10 MB/s would read back several times what they write). The churn and the digests run
in threads, off the agents' event loop.

``--tracker reflink`` (root) puts the disks on an XFS with reflinks on a loop device and
the agents on ``snapshot = "reflink"``: a cycle clones each image and compares extent
maps instead of reading the whole disk (``scan``, the default, reads and hashes every
block every cycle — on two cores, 8 such agents take what the process server needs).

Measured: the process server's RSS every ``--sample-seconds`` (flat: its growth from the
first sample after warm-up to the last), the RPO of each point (from the moment its cycle
read the disk to the moment the process server logged it uploaded) as p50/p99/max,
verifications done and failed, prunes done. The issue's figure: 8 agents at 10 MB/s for an
hour (``--agents 8 --churn-mb-s 10 --minutes 60``); on two cores that rate takes 1 MiB
blocks (``--block-kib 1024``: 64 KiB ones ingest 30-44 MB/s there, bench_ingest.py) and a
shorter retention to fit the disk (``--keep-minutes 5 --prune-minutes 5``).

Run: ``.venv/bin/python benchmarks/soak.py [--agents 8] [--churn-mb-s 10] [--minutes 60]
[--json]``. Not a test: nothing here runs under pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_e2e import quiet_logs
from bench_ingest import toml
from chaosdaemons import Daemon
from diskgen import generate, sha256_file
from loopfs import xfs_folder

from configserver.ca import CertificateAuthority, write_bundle
from mobility.agent import Agent
from mobility.config import MobilityConfig
from mobility.snapshot import Quiesced
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile
from vault.locks import locked
from vault.materialize import materialize
from vault.prune import prune
from vault.repo import Vault
from vault.retention import Retention
from vault.store.local import LocalStore


def say(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def churn(path: Path, nbytes: int, rng: random.Random, block: int) -> int:
    """Overwrite ``nbytes`` of ``path`` in random whole blocks of ``block`` bytes (a write
    smaller than the replication block would make the agent send the whole block); the
    bytes written."""
    n = path.stat().st_size // block
    blocks = rng.sample(range(n), min(n, max(1, nbytes // block)))
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * block)
            f.write(rng.randbytes(block))
    return len(blocks) * block


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return round(s[min(len(s) - 1, int(p / 100 * len(s)))], 2)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.work).resolve() / "soak"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ca = CertificateAuthority.load_or_create(root / "ca")
    tls = write_bundle(root / "tls", "server", ca.issue_server("procserver", ["127.0.0.1"]),
                       ca.cert_pem)
    key = root / "vault.key"
    v = await Vault.create(LocalStore(root / "vault"), KeyMaterial(keyfile=new_keyfile(key)))
    await v.close()
    (root / "procserver.toml").write_text(toml({
        "data_dir": str(root / "procserver"), "vault_url": f"file://{root / 'vault'}",
        "vault_key_file": str(key), "tls_cert": str(tls[0]), "tls_key": str(tls[1]),
        "tls_ca": str(ca.cert_path), "listen_port": 0, "metrics_port": 0}))
    ps = Daemon("procserver", root / "procserver.toml", "procserver_started")
    port = int((await ps.start())["port"])
    try:
        if args.tracker == "reflink":
            # the images, and the extents the churn moved them away from the last
            # cycle's clone and the current one (twice the disks filled a third more)
            with xfs_folder(root, 3 * args.agents * (args.size_mib << 20) + (1 << 30)) as d:
                return await _run(args, root, d, key, ca, ps, port)
        return await _run(args, root, root, key, ca, ps, port)
    finally:
        await ps.stop()


async def _run(args: argparse.Namespace, root: Path, disks: Path, key: Path,
               ca: CertificateAuthority, ps: Daemon, port: int) -> dict[str, Any]:
    assert ps.proc is not None
    # cycle -> (read at, digest or "" when it is not to be verified, machine)
    captured: dict[str, tuple[float, str, str]] = {}
    uploaded_at: dict[str, float] = {}
    got_point = asyncio.Event()
    stop = asyncio.Event()
    agents = []
    for i in range(args.agents):
        m = f"soak{i:02d}"
        disk = disks / f"{m}.img"
        generate(disk, args.size_mib << 20, args.seed + i)
        b = write_bundle(root / m, "agent", ca.issue_client(m), ca.cert_pem)
        agents.append((Agent(MobilityConfig(
            machine=m, server_host="127.0.0.1", server_port=port, tls_ca=str(b[2]),
            tls_cert=str(b[0]), tls_key=str(b[1]), state_dir=str(root / m / "state"),
            disks=[{"name": "sda", "path": str(disk)}], block_size=args.block_kib << 10,
            snapshot="reflink" if args.tracker == "reflink" else "none"),
            provider=None if args.tracker == "reflink" else Quiesced()), disk))
    # with --verify-sample N, a machine's cycle takes the digest when its last digest is
    # this old: N verifiable points per verification round
    written = [0]  # bytes the churn wrote, all agents
    digest_every = args.verify_minutes * 60 / args.verify_sample if args.verify_sample else 0

    async def run_agent(agent: Agent, disk: Path, rng: random.Random) -> None:
        digested = -float("inf")
        while not stop.is_set():
            started = time.monotonic()
            n = await asyncio.to_thread(churn, disk, int(args.churn_mb_s * 1e6 * args.interval),
                                        rng, args.block_kib << 10)
            written[0] += n  # not `+= await`: that reads the sum before the wait
            read_at, digest = time.time(), ""
            if started - digested >= digest_every:
                digest, digested = await asyncio.to_thread(sha256_file, disk), started
            r = await agent.replicate_once()
            captured[r.cycle] = (read_at, digest, agent.cfg.machine)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, args.interval
                                               - (time.monotonic() - started))):
                    await stop.wait()

    samples: list[tuple[float, int]] = []
    rpo: list[float] = []
    verified, failed, prunes = 0, 0, 0
    checked: set[str] = set()
    t0 = time.monotonic()

    async def watch_points() -> None:
        while True:
            await ps.changed.wait()
            ps.changed.clear()
            now = time.time()
            for cycle in ps.points:
                uploaded_at.setdefault(cycle, now)
            got_point.set()

    async def verify(vault: Vault) -> None:
        nonlocal verified, failed
        # Points first, then the index: the reverse of the write order, so a point written
        # meanwhile is either not listed or indexed.
        points = [p for m in sorted({m for _t, _d, m in captured.values()})
                  for p in await vault.list_points(m)]
        index = await vault.load_index()
        for p in points:
            if p.id in checked or not captured.get(p.cycle, (0, "", ""))[1]:
                continue
            out = root / "verify.img"
            await materialize(vault, p, "sda", str(out), index=index)
            ok = await asyncio.to_thread(sha256_file, out) == captured[p.cycle][1]
            out.unlink()
            checked.add(p.id)
            verified += ok
            failed += not ok

    watcher = asyncio.create_task(watch_points())
    tasks = [asyncio.create_task(run_agent(a, d, random.Random(args.seed * 1000 + i)))
             for i, (a, d) in enumerate(agents)]
    vault = await Vault.open(LocalStore(root / "vault"), KeyMaterial(keyfile=read_keyfile(key)))
    next_prune = t0 + args.prune_minutes * 60
    next_verify = t0 + args.verify_minutes * 60
    next_sample = t0
    end = t0 + args.minutes * 60
    try:
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                samples.append((round(now - t0, 1), rss(ps.proc.pid)))
                say(f"{now - t0:.0f} s: procserver RSS {samples[-1][1] >> 20} MiB, "
                    f"{len(uploaded_at)} points, {verified} verified, {failed} failed")
                next_sample += args.sample_seconds
            if now >= next_prune:
                keep = args.keep_minutes / 60
                async with locked(vault, "exclusive", "soak prune", wait=600):
                    with ThreadPoolExecutor(2) as ex:
                        await prune(vault, Retention(keep, keep, keep, keep), ex,
                                    now=datetime.now(UTC))
                prunes += 1
                next_prune += args.prune_minutes * 60
            if now >= next_verify:
                async with locked(vault, "shared", "soak verify", wait=600):
                    await verify(vault)
                next_verify += args.verify_minutes * 60
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a, _d in agents:
            a.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(600):
            while set(captured) - set(uploaded_at):
                got_point.clear()
                await got_point.wait()
    async with locked(vault, "shared", "soak verify", wait=600):
        await verify(vault)
    await vault.close()
    watcher.cancel()
    for cycle, (read_at, _digest, _machine) in captured.items():
        if cycle in uploaded_at:
            rpo.append(uploaded_at[cycle] - read_at)
    warm = [s for s in samples if s[0] >= args.warmup_seconds] or samples
    return {
        "agents": args.agents, "churn_mb_s_per_agent": args.churn_mb_s,
        "block_kib": args.block_kib, "tracker": args.tracker,
        "keep_minutes": args.keep_minutes,
        "prune_minutes": args.prune_minutes,
        "minutes": args.minutes, "size_mib": args.size_mib, "cycles": len(captured),
        "mean_cycle_s": round(args.minutes * 60 * args.agents / max(1, len(captured)), 1),
        "written_mb_s_per_agent": round(written[0] / 1e6 / (args.minutes * 60) / args.agents,
                                        2),
        "rss_mib": [[t, r >> 20] for t, r in samples],
        "rss_growth_mib": round((warm[-1][1] - warm[0][1]) / 2**20, 1) if warm else 0.0,
        "rpo_p50_s": pct(rpo, 50), "rpo_p99_s": pct(rpo, 99),
        "rpo_max_s": round(max(rpo), 2) if rpo else 0.0,
        "verified": verified, "verification_failures": failed, "prunes": prunes,
        "verify_sample": args.verify_sample, "points_uploaded": len(uploaded_at),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--churn-mb-s", type=float, default=10.0, help="per agent (default 10)")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--size-mib", type=int, default=1024, help="each disk (default 1024)")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between cycles")
    ap.add_argument("--block-kib", type=int, default=64, choices=(64, 128, 256, 512, 1024),
                    help="the agents' replication block size, and the churn's write size "
                         "(default 64, the agent's default)")
    ap.add_argument("--prune-minutes", type=float, default=10.0)
    ap.add_argument("--keep-minutes", type=float, default=15.0)
    ap.add_argument("--verify-minutes", type=float, default=10.0)
    ap.add_argument("--verify-sample", type=int, default=0, metavar="N",
                    help="verify N points of each machine per round, spread over it "
                         "(default 0: all)")
    ap.add_argument("--tracker", choices=("scan", "reflink"), default="scan",
                    help="how the agents find changed blocks: scan reads the whole disk "
                         "every cycle; reflink (root) clones images on an XFS loop "
                         "device and compares extents (default scan)")
    ap.add_argument("--sample-seconds", type=float, default=60.0)
    ap.add_argument("--warmup-seconds", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "work"))
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    res = asyncio.run(soak(args))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, val in res.items():
            print(f"{k:24} {val}")
    return 0 if res["verification_failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
