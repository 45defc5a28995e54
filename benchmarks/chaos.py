"""Randomized fault runs against a real process server and agent, then the proof.

Each run changes a seeded share of the disk, starts one agent cycle (``siterecovery
mobility replicate``, its own process) through a TCP proxy to the process server (``siterecovery
procserver run``, its own process), and at a random moment injects one fault:

- ``kill_procserver``: ``kill -9`` of the process server, restarted on the same data
  directory (it resumes its uploads from its cache);
- ``kill_agent``: ``kill -9`` of the agent in the middle of its cycle;
- ``reset``: the proxy resets every connection between them;
- ``storage_outage``: the vault's folder is replaced by a file for 0.2-2 s (every
  store call fails; uploads retry);
- ``none``: the cycle runs undisturbed.

A cycle is *acknowledged* when the agent printed its result (it got the ACK). After the
last run a clean cycle is taken and every acknowledged cycle is waited for in the vault.
The proof: every acknowledged cycle is a point that restores byte-exact to the disk as it
was when that cycle ran; every other point restores to some state the disk had. Prints
runs, faults of each kind, points verified and bytes lost (the disk size for each
acknowledged cycle without a byte-exact point: must be 0). Exit status 1 otherwise.

Not covered here: ``kill -9`` of the configuration server (the data path does not go
through it; tests/test_procserver_failover.py and the job tests kill and restart it
elsewhere).

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

from bench_ingest import toml
from diskgen import generate, sha256_file

from configserver.ca import CertificateAuthority, write_bundle
from vault.keyslots import KeyMaterial, new_keyfile
from vault.materialize import materialize
from vault.repo import Vault
from vault.store.local import LocalStore

FAULTS = ("kill_procserver", "kill_agent", "reset", "storage_outage", "none")
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


class Proxy:
    """127.0.0.1:port → the process server's current port; ``reset()`` aborts every
    connection in both directions."""

    def __init__(self) -> None:
        self.target = 0
        self.port = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.transport.abort()
            return
        pair = (w, uw)
        self._pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pipe(r, uw), pipe(ur, w))
        finally:
            self._pairs.discard(pair)

    def reset(self) -> None:
        for a, b in list(self._pairs):
            a.transport.abort()
            b.transport.abort()

    async def close(self) -> None:
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class ProcServer:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.points: dict[str, str] = {}  # cycle -> point, as it logged them
        self.uploaded = asyncio.Event()  # set at each point it logs
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "siterecovery", "--log-level", "info", "procserver", "run",
            "--config", str(self.config), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the process server did not start")
            ev = json.loads(line) if line.startswith(b"{") else {}
            if ev.get("event") == "procserver_started":
                self._reader = asyncio.create_task(self._read())
                return int(ev["port"])

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if b'"point_uploaded"' in line:
                ev = json.loads(line)
                self.points[str(ev["cycle"])] = str(ev["point"])
                self.uploaded.set()

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


async def agent_cycle(config: Path, fault: str, delay: float, ps: ProcServer, proxy: Proxy,
                      vault_dir: Path, rng: random.Random) -> str | None:
    """One agent cycle with ``fault`` after ``delay`` seconds; its cycle id if it was
    acknowledged."""
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "siterecovery", "--log-level", "warning", "mobility",
        "replicate", "--config", str(config), "--json", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    done = asyncio.create_task(agent.communicate())
    finished, _ = await asyncio.wait([done], timeout=delay)
    if not finished and fault == "kill_agent":
        agent.send_signal(signal.SIGKILL)
    elif not finished and fault == "kill_procserver":
        await ps.kill9()
        proxy.target = await ps.start()
    elif not finished and fault == "reset":
        proxy.reset()
    if fault == "storage_outage":
        # A file in the folder's place: every read and write of the store fails.
        away = vault_dir.with_name(vault_dir.name + ".away")
        vault_dir.rename(away)
        vault_dir.write_bytes(b"")
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        vault_dir.unlink()
        away.rename(vault_dir)
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
    ca = CertificateAuthority.load_or_create(root / "ca")
    tls = write_bundle(root / "tls", "server", ca.issue_server("procserver", ["127.0.0.1"]),
                       ca.cert_pem)
    key = root / "vault.key"
    vault_dir = root / "vault"
    v = await Vault.create(LocalStore(vault_dir), KeyMaterial(keyfile=new_keyfile(key)))
    await v.close()
    (root / "procserver.toml").write_text(toml({
        "data_dir": str(root / "procserver"), "vault_url": f"file://{vault_dir}",
        "vault_key_file": str(key), "tls_cert": str(tls[0]), "tls_key": str(tls[1]),
        "tls_ca": str(ca.cert_path), "listen_port": 0, "metrics_port": 0,
        "resume_window_seconds": 60.0}))
    ps = ProcServer(root / "procserver.toml")
    proxy = Proxy()
    await proxy.start()
    proxy.target = await ps.start()
    b = write_bundle(root / "agent", "agent", ca.issue_client("chaos01"), ca.cert_pem)
    agent_cfg = root / "agent" / "mobility.toml"
    agent_cfg.write_text(toml({
        "machine": "chaos01", "server_host": "127.0.0.1", "server_port": proxy.port,
        "tls_ca": str(b[2]), "tls_cert": str(b[0]), "tls_key": str(b[1]),
        "state_dir": str(root / "agent" / "state"), "snapshot": "quiesced",
        "connect_timeout_seconds": 10.0,
        "disks": [{"name": "sda", "path": str(disk)}]}))
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
            cycle = await agent_cycle(agent_cfg, fault, rng.uniform(0.05, 2.0), ps, proxy,
                                      vault_dir, rng)
            if not last:
                faults[fault] += 1
            if cycle is not None:
                acked[cycle] = state
            if (run + 1) % 25 == 0:
                say(f"{run + 1} runs, {len(acked)} acknowledged, {dict(faults)}")
        say("waiting for every acknowledged cycle to be a point")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.drain_seconds):
                while set(acked) - set(ps.points):
                    ps.uploaded.clear()
                    await ps.uploaded.wait()
    finally:
        await ps.stop()
        await proxy.close()
    return await prove(root, key, acked, attempted, faults, args, time.monotonic() - started)


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
            "seconds": round(seconds, 1), "seed": args.seed, "size_mib": args.size_mib}


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
    return 0 if res["bytes_lost"] == 0 and res["points_wrong"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
