"""Profile one siterecovery initial (and optionally delta) cycle in one process.

A development tool next to ``bench_e2e.py``: no restic, no configuration server. It
starts a process server and an agent on loopback (real mutual TLS, real fsynced HRL
cache, real local-folder vault) under uvloop, times the cycle until it is acknowledged
and until its point is whole, and with ``--profile`` prints the event loop thread's
cProfile (worker threads are not profiled: their time shows as the loop waiting).

Run: ``.venv/bin/python benchmarks/profile_cycle.py [--size-mib 512] [--profile]
[--sort tottime] [--delta | --no-upload | --upload-only] [--repeat N] [--timeline S]``
(see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import logging
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog
import uvloop
from diskgen import generate, mutate

from configserver.ca import CertificateAuthority, write_bundle
from mobility.agent import Agent
from mobility.config import MobilityConfig
from mobility.snapshot import Quiesced
from procserver.config import ProcServerConfig
from procserver.server import ProcServer
from vault.keyslots import KeyMaterial, new_keyfile
from vault.repo import Vault
from vault.store.local import LocalStore


async def run(args: argparse.Namespace, work: Path) -> None:
    image = work / "disk.img"
    t = time.perf_counter()
    generate(image, args.size_mib << 20, args.seed)
    print(f"image generated in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    ca = CertificateAuthority.load_or_create(work / "ca")
    scert, skey, _ = write_bundle(work / "server", "server",
                                  ca.issue_server("procserver", ["127.0.0.1"]), ca.cert_pem)
    ccert, ckey, _ = write_bundle(work / "client", "agent", ca.issue_client("bench-vm"),
                                  ca.cert_pem)
    tls = TlsFiles(ca.cert_path, scert, skey, ccert, ckey)
    wholes: list[float] = []
    for i in range(args.repeat):
        run_dir = work / f"run{i}"
        wholes.append(await one_run(args, run_dir, image, tls))
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.repeat > 1:
        print(f"{args.repeat} runs, last cycle whole after: "
              + ", ".join(f"{w:.2f}" for w in wholes)
              + f" s; median {statistics.median(wholes):.2f} s, best {min(wholes):.2f} s")


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


async def one_run(args: argparse.Namespace, work: Path, image: Path, tls: TlsFiles) -> float:
    """One fresh vault, process server and agent; return the last cycle's seconds until
    its point was whole."""
    key = work / "vault.key"
    work.mkdir(parents=True)
    await (await Vault.create(LocalStore(work / "vault"),
                              KeyMaterial(keyfile=new_keyfile(key)))).close()
    cfg = ProcServerConfig(
        data_dir=str(work / "ps"),
        vault_url=(f"fault+file://{work / 'vault'}?hang=packs/"
                   if args.no_upload or args.upload_only else f"file://{work / 'vault'}"),
        vault_key_file=str(key), tls_cert=str(tls.server_cert), tls_key=str(tls.server_key),
        tls_ca=str(tls.ca), listen_port=0, metrics_port=0,
        segment_bytes=args.segment_mib << 20, upload_threads=args.upload_threads)
    ps = ProcServer(cfg)
    await ps.start()
    agent = Agent(MobilityConfig(
        machine="bench-vm", server_host="127.0.0.1", server_port=ps.port,
        tls_ca=str(tls.ca), tls_cert=str(tls.client_cert), tls_key=str(tls.client_key),
        state_dir=str(work / "agent"), disks=[{"name": "sda", "path": str(image)}]),
        provider=Quiesced())
    prof = cProfile.Profile() if args.profile else None
    before = thread_cpu()
    sampler = CpuTimeline(args.timeline) if args.timeline else None
    whole = 0.0
    try:
        for i in range(2 if args.delta else 1):
            if i:
                mutate(image, 0.02, args.seed + 1000)
            if prof is not None and not args.upload_only:
                prof.enable()
            t = time.perf_counter()
            cpu = os.times()
            r = await agent.replicate_once()
            acked = time.perf_counter() - t
            if args.upload_only:
                # Everything is in the cache: a server on a healthy store uploads it alone.
                await ps.stop()
                ps = ProcServer(dataclasses.replace(cfg, vault_url=f"file://{work / 'vault'}"))
                if prof is not None:
                    prof.enable()
                t = time.perf_counter()
                cpu = os.times()
                before = thread_cpu()
                await ps.start()
            if not args.no_upload:
                await ps.wait_point(r.cycle, timeout=3600)
            whole = time.perf_counter() - t
            cpu2 = os.times()
            if prof is not None:
                prof.disable()
            if sampler is not None:
                sampler.mark("acked", t + acked)
                sampler.mark("whole", t + whole)
            done = "uploaded alone in" if args.upload_only else "point whole after"
            print(f"{'full' if r.full else 'delta'}: {r.blocks_sent} blocks, "
                  f"{r.bytes_sent / 1e6:.1f} MB, acked after {acked:.2f} s, "
                  f"{done} {whole:.2f} s; process CPU "
                  f"user {cpu2.user - cpu.user:.2f} s, system {cpu2.system - cpu.system:.2f} s")
        if not args.quiet:
            print_thread_cpu(before)
        if sampler is not None:
            sampler.stop()
            sampler.print()
    finally:
        agent.close()
        await ps.stop()
    if prof is not None:
        pstats.Stats(prof, stream=sys.stdout).sort_stats(args.sort).print_stats(args.top)
    return whole


class CpuTimeline:
    """Samples the process's CPU use (user, system; 1.0 = one core) every ``step``
    seconds on a thread of its own, to see where the cores idle during a cycle."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.t0 = time.perf_counter()
        self.rows: list[tuple[float, float, float]] = []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-timeline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_t, last = time.perf_counter(), os.times()
        while not self._stop.wait(self.step):
            now_t, now = time.perf_counter(), os.times()
            dt = now_t - last_t
            self.rows.append((now_t - self.t0, (now.user - last.user) / dt,
                              (now.system - last.system) / dt))
            last_t, last = now_t, now

    def mark(self, what: str, when: float) -> None:
        self.marks.append((when - self.t0, what))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def print(self) -> None:
        marks = sorted(self.marks)
        print(f"CPU timeline (every {self.step:g} s; # = user, + = system, 10 per core):")
        for at, user, system in self.rows:
            notes = [w for m, w in marks if at - self.step < m <= at]
            bar = "#" * round(user * 10) + "+" * round(system * 10)
            print(f"  {at:6.2f} s {user + system:4.2f} {bar:<22} {' '.join(notes)}")


def thread_cpu() -> dict[str, tuple[float, float, int]]:
    """User and system CPU seconds and minor page faults of every live thread so far,
    from /proc (Linux only)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for t in threading.enumerate():
        try:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{t.name}/{t.native_id}"] = (int(fields[11]) / tick, int(fields[12]) / tick,
                                          int(fields[7]))
    return out


def print_thread_cpu(before: dict[str, tuple[float, float, int]]) -> None:
    rows = []
    for name, (user, system, faults) in thread_cpu().items():
        u0, s0, f0 = before.get(name, (0.0, 0.0, 0))
        rows.append((user - u0, system - s0, faults - f0, name))
    for user, system, faults, name in sorted(rows, key=lambda r: -(r[0] + r[1])):
        if user + system > 0:
            print(f"  thread {name:<40} user {user:6.2f} s  system {system:6.2f} s  "
                  f"minor faults {faults:>8}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile the event loop thread")
    ap.add_argument("--sort", default="tottime", help="pstats sort key (default tottime)")
    ap.add_argument("--top", type=int, default=40, help="rows of the profile to print")
    ap.add_argument("--delta", action="store_true", help="also time a 2 %% delta cycle")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="cycles on a fresh vault and server N times on the same image "
                         "(with --delta the image keeps changing) and print a summary")
    ap.add_argument("--switch-interval", type=float, metavar="SECONDS",
                    help="sys.setswitchinterval (the GIL hand-over period; Python's "
                         "default is 0.005)")
    ap.add_argument("--quiet", action="store_true", help="leave out the CPU per thread")
    ap.add_argument("--timeline", type=float, metavar="SECONDS", default=0.0,
                    help="sample the process's CPU use every SECONDS and print it")
    ap.add_argument("--segment-mib", type=int, default=64, help="HRL segment size")
    ap.add_argument("--upload-threads", type=int, default=2, help="upload_threads")
    ap.add_argument("--upload-only", action="store_true",
                    help="receive with uploads hanging, then time a restarted server's "
                         "upload of the cached cycle alone")
    ap.add_argument("--no-upload", action="store_true",
                    help="uploads hang: time the receive path alone (until the ack)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.delta and (args.no_upload or args.upload_only):
        ap.error("--delta needs the uploads (a delta builds on the point before it)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sr-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        uvloop.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
