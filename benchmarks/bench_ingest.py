"""Aggregate ingest: several agents replicate their initial copies at once into one
process server; its throughput and its peak memory.

The process server runs as its own daemon (``siterecovery procserver run``, uvloop) so
its peak RSS (VmHWM) is its own; each agent is its own ``siterecovery mobility
replicate`` process, as on separate machines. Every disk is a seeded image
(``--total-mib`` split over ``--agents``, 2 GiB over 8 by default).

Measured: ingest MB/s = image bytes of all agents / seconds until the last agent's
cycle was acknowledged (durable in the cache); "whole" = until every point is in the
vault; peak RSS of the process server. Targets: at least 200 MB/s with the peak RSS
under 512 MiB.

Run: ``.venv/bin/python benchmarks/bench_ingest.py [--agents N] [--total-mib M] [--json]``.
Not a test: nothing here runs under pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_e2e import live_cpu_seconds, quiet_logs, say
from diskgen import generate

from configserver.ca import CertificateAuthority, write_bundle
from vault.keyslots import KeyMaterial, new_keyfile
from vault.repo import Vault
from vault.store.local import LocalStore

TARGET_MB_S = 200.0
TARGET_RSS = 512 << 20
OWNED = ("ingest",)


def toml(doc: dict[str, Any]) -> str:
    def v(x: Any) -> str:
        if isinstance(x, list):
            return "[" + ", ".join(v(i) for i in x) + "]"
        if isinstance(x, dict):
            return "{ " + ", ".join(f"{k} = {v(i)}" for k, i in x.items()) + " }"
        return json.dumps(x)

    return "".join(f"{k} = {v(x)}\n" for k, x in doc.items())


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.work).resolve() / "ingest"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    per = (args.total_mib << 20) // args.agents
    say(f"generating {args.agents} images of {per >> 20} MiB")
    disks = []
    for i in range(args.agents):
        d = root / f"disk{i}.img"
        generate(d, per, args.seed + i)
        disks.append(d)
    ca = CertificateAuthority.load_or_create(root / "ca")
    tls = write_bundle(root / "tls", "server", ca.issue_server("procserver", ["127.0.0.1"]),
                       ca.cert_pem)
    key = root / "vault.key"
    v = await Vault.create(LocalStore(root / "vault"), KeyMaterial(keyfile=new_keyfile(key)))
    await v.close()
    (root / "procserver.toml").write_text(toml({
        "data_dir": str(root / "procserver"), "vault_url": f"file://{root / 'vault'}",
        "vault_key_file": str(key), "tls_cert": str(tls[0]), "tls_key": str(tls[1]),
        "tls_ca": str(ca.cert_path), "listen_port": 0, "metrics_port": 0,
        "cache_quota_bytes": max(4 << 30, 2 * args.total_mib << 20)}))
    ps = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "siterecovery", "--log-level", "info", "procserver", "run",
        "--config", str(root / "procserver.toml"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    assert ps.stdout is not None
    port = 0
    while not port:
        line = await ps.stdout.readline()
        if not line:
            raise RuntimeError("the process server did not start")
        ev = json.loads(line) if line.startswith(b"{") else {}
        if ev.get("event") == "procserver_started":
            port = int(ev["port"])
    uploaded = 0
    all_uploaded = asyncio.Event()

    async def follow() -> None:
        nonlocal uploaded
        assert ps.stdout is not None
        while line := await ps.stdout.readline():
            if b'"point_uploaded"' in line:
                uploaded += 1
                if uploaded == args.agents:
                    all_uploaded.set()

    follower = asyncio.create_task(follow())
    configs = []
    for i, d in enumerate(disks):
        m = f"ingest{i}"
        b = write_bundle(root / "agents" / m, "agent", ca.issue_client(m), ca.cert_pem)
        cfg = root / "agents" / m / "mobility.toml"
        cfg.write_text(toml({
            "machine": m, "server_host": "127.0.0.1", "server_port": port,
            "tls_ca": str(b[2]), "tls_cert": str(b[0]), "tls_key": str(b[1]),
            "state_dir": str(root / "agents" / m / "state"), "snapshot": "quiesced",
            "block_size": args.block_kib << 10,
            "disks": [{"name": "sda", "path": str(d)}]}))
        configs.append(cfg)
    for d in disks:  # warm the page cache alike for every agent
        with open(d, "rb") as f:
            while f.read(8 << 20):
                pass
    say(f"{args.agents} agents replicating at once")
    t0 = time.perf_counter()
    agents = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "siterecovery", "mobility", "replicate", "--config", str(c),
        "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for c in configs]
    outs = await asyncio.gather(*(a.communicate() for a in agents))
    acked = time.perf_counter() - t0
    for a, (_out, err) in zip(agents, outs, strict=True):
        if a.returncode != 0:
            raise RuntimeError(f"an agent failed: {err.decode()[-2000:]}")
    await asyncio.wait_for(all_uploaded.wait(), 3600)
    whole = time.perf_counter() - t0
    rss, cpu = peak_rss(ps.pid), live_cpu_seconds(ps.pid)
    ps.terminate()
    await ps.wait()
    follower.cancel()
    total = per * args.agents
    res = {"agents": args.agents, "total_bytes": total, "acked_s": round(acked, 2),
           "whole_s": round(whole, 2), "ingest_mb_s": round(total / acked / 1e6, 1),
           "end_to_end_mb_s": round(total / whole / 1e6, 1),
           "procserver_peak_rss_mib": round(rss / 2**20, 1),
           "procserver_cpu_s": round(cpu, 2), "cpus": os.cpu_count(),
           "target_mb_s": TARGET_MB_S, "target_rss_mib": TARGET_RSS >> 20}
    if not args.keep:
        import shutil

        shutil.rmtree(root)
    return res


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--agents", type=int, default=8, help="concurrent agents (default 8)")
    ap.add_argument("--total-mib", type=int, default=2048,
                    help="image bytes over all agents (default 2048)")
    ap.add_argument("--block-kib", type=int, default=1024,
                    help="agents' block size in KiB (default 1024)")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "work"),
                    help="working directory (default benchmarks/work/, git-ignored)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the files after the run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    res = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"ingest with {res['agents']} agents ({res['total_bytes'] >> 20} MiB in all):")
        print(f"  acknowledged after {res['acked_s']:.2f} s: {res['ingest_mb_s']:.1f} MB/s "
              f"(target >= {TARGET_MB_S:g}: {res['ingest_mb_s'] / TARGET_MB_S:.2f}x)")
        print(f"  whole in the vault after {res['whole_s']:.2f} s: "
              f"{res['end_to_end_mb_s']:.1f} MB/s")
        print(f"  process server peak RSS {res['procserver_peak_rss_mib']:.1f} MiB "
              f"(target < {TARGET_RSS >> 20} MiB)")
    ok = res["ingest_mb_s"] >= TARGET_MB_S and res["procserver_peak_rss_mib"] < TARGET_RSS >> 20
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
