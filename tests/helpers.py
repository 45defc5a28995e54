"""Shared test helpers: disks, PKI, vaults, servers and agents — all real, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from common.digest import block_count, digest_of_fingerprint_map, fingerprint
from configserver.ca import CertificateAuthority, write_bundle
from mobility.agent import Agent
from mobility.config import MobilityConfig
from mobility.snapshot import Quiesced
from procserver.config import ProcServerConfig
from procserver.server import ProcServer
from siterecovery.demo import make_disk as make_disk  # one disk generator for demo and tests
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile
from vault.materialize import materialize
from vault.point import Point
from vault.repo import Vault
from vault.store.local import LocalStore
from vault.writer import CycleWriter, DiskSpec

BLOCK = 64 * 1024
REPO = Path(__file__).resolve().parent.parent


def mutate(path: Path, fraction: float, seed: int, zero_share: float = 0.1) -> list[int]:
    """Overwrite a fraction of 64 KiB blocks at random; some become zero."""
    rng = random.Random(seed)
    size = path.stat().st_size
    picks = rng.sample(range(size // BLOCK), max(1, int(size // BLOCK * fraction)))
    with open(path, "r+b") as f:
        for n in picks:
            f.seek(n * BLOCK)
            f.write(bytes(BLOCK) if rng.random() < zero_share else rng.randbytes(BLOCK))
    return picks


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Pki:
    dir: Path
    ca: CertificateAuthority

    def server(self) -> tuple[str, str]:
        d = self.dir / "server"
        if not (d / "server.pem").exists():
            write_bundle(d, "server", self.ca.issue_server("procserver", ["127.0.0.1",
                                                                          "localhost"]),
                         self.ca.cert_pem)
        return str(d / "server.pem"), str(d / "server.key")

    def client(self, machine: str) -> tuple[str, str]:
        d = self.dir / "clients" / machine
        if not (d / "agent.pem").exists():
            write_bundle(d, "agent", self.ca.issue_client(machine), self.ca.cert_pem)
        return str(d / "agent.pem"), str(d / "agent.key")

    @property
    def ca_path(self) -> str:
        return str(self.ca.cert_path)


def make_pki(d: Path) -> Pki:
    return Pki(d, CertificateAuthority.load_or_create(d / "ca"))


async def make_vault(d: Path) -> tuple[str, Path]:
    """Create a local vault; return its URL and key file path."""
    key = d / "vault.key"
    v = await Vault.create(LocalStore(d / "vault"), KeyMaterial(keyfile=new_keyfile(key)))
    await v.close()
    return f"file://{d / 'vault'}", key


async def open_vault(url_dir: Path, key: Path) -> Vault:
    return await Vault.open(LocalStore(url_dir), KeyMaterial(keyfile=read_keyfile(key)))


def proc_config(tmp: Path, pki: Pki, vault_url: str, key: Path, **kw: object) -> ProcServerConfig:
    cert, pkey = pki.server()
    base: dict[str, object] = dict(
        data_dir=str(tmp / "procserver"), vault_url=vault_url, vault_key_file=str(key),
        tls_cert=cert, tls_key=pkey, tls_ca=pki.ca_path, listen_port=0, metrics_port=0,
        # the cache's free ratio is min(quota - used, the disk's free) / quota: a quota
        # well below what a test host's disk has free keeps it (and its alert) the test's
        cache_quota_bytes=512 << 20,
    )
    base.update(kw)
    return ProcServerConfig(**base)  # type: ignore[arg-type]


@asynccontextmanager
async def running_procserver(cfg: ProcServerConfig) -> AsyncIterator[ProcServer]:
    ps = ProcServer(cfg)
    await ps.start()
    try:
        yield ps
    finally:
        await ps.stop()


def agent_config(tmp: Path, pki: Pki, machine: str, port: int, disks: dict[str, Path],
                 **kw: object) -> MobilityConfig:
    cert, key = pki.client(machine)
    base: dict[str, object] = dict(
        machine=machine, server_host="127.0.0.1", server_port=port, tls_ca=pki.ca_path,
        tls_cert=cert, tls_key=key, state_dir=str(tmp / f"agent-{machine}"),
        disks=[{"name": n, "path": str(p)} for n, p in disks.items()],
    )
    base.update(kw)
    return MobilityConfig(**base)  # type: ignore[arg-type]


def make_agent(cfg: MobilityConfig) -> Agent:
    return Agent(cfg, provider=Quiesced())


async def restore_all(vault: Vault, point: Point, out_dir: Path) -> dict[str, str]:
    """Materialize every disk of ``point``; return disk -> sha256 of the restored image."""
    index = await vault.load_index()
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    with ThreadPoolExecutor(2) as ex:
        for d in point.disks:
            out = out_dir / f"{point.id[:12]}-{d.disk}.img"
            await materialize(vault, point, d.disk, str(out), index=index, executor=ex)
            result[d.disk] = sha256(out)
            out.unlink()
    return result


async def point_restores_to(ps: ProcServer, tmp: Path, key: Path, cycle: str,
                            want: dict[str, str]) -> None:
    """The point of the acknowledged ``cycle`` (in the vault at ``tmp/vault``) restores to
    exactly ``want`` (disk -> sha256)."""
    vault = await open_vault(tmp / "vault", key)
    try:
        point = await vault.read_point(await ps.wait_point(cycle, timeout=60))
        assert await restore_all(vault, point, tmp / "out" / cycle) == want
    finally:
        await vault.close()


class Daemon:
    """A real ``siterecovery`` daemon in a subprocess, ready once it logs ``ready_event``."""

    def __init__(self, args: list[str], ready_event: str, env: dict[str, str] | None = None):
        self.args, self.ready_event = args, ready_event
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, object] = {}
        self.lines: list[str] = []
        self._new_line = asyncio.Condition()
        self._drain: asyncio.Task[None] | None = None  # reads its output once it is ready

    async def start(self, timeout: float = 60) -> dict[str, object]:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "siterecovery", "--log-level", "info", *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self.env,
            cwd=REPO)
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        raise RuntimeError("daemon exited before ready:\n" +
                                           "".join(self.lines))
                    text = line.decode(errors="replace")
                    self.lines.append(text)
                    try:
                        ev = json.loads(text)
                    except ValueError:
                        continue
                    if ev.get("event") == self.ready_event:
                        self.ready = ev
                        break
        except BaseException:  # never ready: it does not outlive the test
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            raise
        self._drain = asyncio.create_task(self._read_rest())
        return self.ready

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace"))
            async with self._new_line:
                self._new_line.notify_all()
        async with self._new_line:
            self._new_line.notify_all()

    async def wait_events(self, name: str, count: int, timeout: float = 120
                          ) -> list[dict[str, object]]:
        """Wait until the daemon logged ``count`` events named ``name``."""
        async with asyncio.timeout(timeout), self._new_line:
            while len(evs := self.events(name)) < count:
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise RuntimeError("daemon exited:\n" + "".join(self.lines[-30:]))
                await self._new_line.wait()
            return evs

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == name:
                out.append(ev)
        return out

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        if self._drain is not None:
            await self._drain

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        if self._drain is not None:
            await self._drain
        return self.proc.returncode or 0


def _toml(v: object) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def write_toml(path: Path, doc: dict[str, object]) -> Path:
    lines = [f"{k} = {_toml(v)}" for k, v in doc.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def configserver_daemon(tmp: Path) -> Daemon:
    """``configserver run`` on a fresh data folder in ``tmp``, no site port (not started)."""
    toml = tmp / "configserver.toml"
    write_toml(toml, {"data_dir": str(tmp / "cs"), "listen_port": 0, "site_port": -1})
    return Daemon(["configserver", "run", "--config", str(toml)], "configserver_started")


def run_cli(*args: str, check: bool = False, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """``siterecovery ARGS`` in a subprocess; ``env`` is added to this environment."""
    return subprocess.run([sys.executable, "-m", "siterecovery", *args], capture_output=True,
                          text=True, cwd=REPO, check=check, timeout=300,
                          env={**os.environ, **env} if env else None)


async def write_full_point(vault: Vault, data: bytes, *, machine: str = "m1",
                           cycle: str = "c1", block_size: int = BLOCK,
                           consistency: str = "crash") -> Point:
    """Write ``data`` as one disk ("sda") of a full recovery point, as the process server
    would, with the digest the agent would send (a short last block included)."""
    blocks = [data[n * block_size:(n + 1) * block_size]
              for n in range(block_count(len(data), block_size))]
    with ThreadPoolExecutor(2) as ex:
        w = CycleWriter(vault, await vault.load_index(), ex, machine=machine, cycle=cycle,
                        disks=[DiskSpec("sda", len(data), block_size)], full=True, base=None)
        await w.add([(0, n, b) for n, b in enumerate(blocks)])
        digest = digest_of_fingerprint_map(b"".join(fingerprint(b) for b in blocks))
        return await w.finish({"sda": digest}, consistency)
