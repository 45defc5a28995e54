"""``InstantServers``: the NBD servers of instantly recovered machines, run in this
process for as long as the machines need them.

Per machine (a key: the recovered machine's name) one task opens the vault, holds a
shared vault lock (a prune must not repack the packs being read) and serves each disk
(``instant.pointdisk.PointDisk`` in its overlay folder, ``instant.server.NbdServer`` on
its UNIX socket) until ``stop``. ``hydrate`` copies what is not local yet at a bounded
rate. Serving again after this process restarted resumes from the overlays: a block
local there is never fetched again, so the guest reads what it read and wrote before.
If the process dies, the sockets close and the guest's reads and writes fail (I/O
errors), never return other data.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from common.pacing import Schedule, TokenBucket
from instant.hydrate import hydrate
from instant.pointdisk import PointDisk
from instant.server import NbdServer
from targets.instant import InstantSource
from vault.locks import locked

log = structlog.get_logger("targets.instant")

LOCK_WAIT = 3600.0  # seconds to wait for a prune to release the vault


@dataclass(frozen=True)
class ServedDisk:
    name: str  # the point's disk
    overlay: Path  # its overlay folder (created if need be)
    socket: Path  # its UNIX socket


@dataclass
class _Machine:
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    disks: dict[str, PointDisk] = field(default_factory=dict)
    servers: dict[str, NbdServer] = field(default_factory=dict)
    error: BaseException | None = None


class InstantServersError(Exception):
    """The disks could not be served (the vault, the point, an overlay, a socket)."""


class InstantServers:
    """``socket_owner``: (uid, gid) given each socket (the emulator's user), or None."""

    def __init__(self, socket_owner: tuple[int, int] | None = None) -> None:
        self.socket_owner = socket_owner
        self._machines: dict[str, _Machine] = {}
        self._executor = ThreadPoolExecutor(4, thread_name_prefix="instant")

    def serving(self, key: str) -> bool:
        m = self._machines.get(key)
        return m is not None and m.ready.is_set() and m.error is None

    async def serve(self, key: str, source: InstantSource, disks: list[ServedDisk]) -> None:
        """Return once every disk of ``key`` is served (at once if it is already).
        Raises ``InstantServersError`` saying why not."""
        m = self._machines.get(key)
        if m is not None and m.task is not None and m.task.done():
            del self._machines[key]  # ended (failed, or stopped): serve anew
            m = None
        if m is None:
            m = self._machines[key] = _Machine()
            m.task = asyncio.create_task(self._run(key, m, source, disks),
                                         name=f"instant-{key}")
        await m.ready.wait()
        if m.error is not None:
            raise InstantServersError(f"cannot serve the disks of {key}: {m.error}")

    async def _run(self, key: str, m: _Machine, source: InstantSource,
                   disks: list[ServedDisk]) -> None:
        try:
            vault = await source.open_vault()
        except Exception as e:
            m.error = e
            m.ready.set()
            return
        try:
            async with locked(vault, "shared", f"instant recovery of {key}", wait=LOCK_WAIT), \
                    contextlib.AsyncExitStack() as stack:
                point = await vault.read_point(source.point)
                index = await vault.load_index()  # let go once the disks are located
                try:
                    for d in disks:
                        await asyncio.to_thread(d.overlay.mkdir, mode=0o700, parents=True,
                                                exist_ok=True)
                        disk = await PointDisk.open(vault, point, d.name, str(d.overlay),
                                                    executor=self._executor, index=index)
                        stack.push_async_callback(disk.close)
                        stack.push_async_callback(disk.flush)  # runs before close
                        server = NbdServer({"": disk, d.name: disk}, socket_path=str(d.socket),
                                           socket_owner=self.socket_owner)
                        await server.start()
                        stack.push_async_callback(server.stop)  # runs first
                        m.disks[d.name] = disk
                        m.servers[d.name] = server
                finally:
                    index.close()
                    del index
                log.info("instant_serving", machine=key, point=point.id,
                         disks=[str(d.socket) for d in disks])
                m.ready.set()
                await m.stopping.wait()
        except Exception as e:
            if m.ready.is_set():
                log.error("instant_serving_failed", machine=key, error=str(e))
            m.error = e
        finally:
            m.ready.set()
            m.disks.clear()
            m.servers.clear()
            await vault.close()
            log.info("instant_stopped", machine=key)

    def _served(self, key: str) -> _Machine:
        m = self._machines.get(key)
        if m is None or not m.ready.is_set() or m.error is not None:
            raise InstantServersError(f"the disks of {key} are not served by this process")
        return m

    def progress(self, key: str) -> tuple[int, int]:
        """(bytes, of bytes) of the point's stored data that are local, all disks."""
        m = self._served(key)
        done = sum(d.stored_present * d.block_size for d in m.disks.values())
        total = sum(d.stored_blocks * d.block_size for d in m.disks.values())
        return done, total

    async def connected(self, key: str, timeout: float) -> bool:
        """Whether every disk of ``key`` has a client (its emulator) within ``timeout``
        seconds: after this process restarted, QEMU reconnects on its own schedule (its
        retries back off up to 16 s apart)."""
        m = self._served(key)
        try:
            async with asyncio.timeout(timeout):
                for server in list(m.servers.values()):
                    await server.wait_session()
        except TimeoutError:
            return False
        return True

    async def hydrate(self, key: str, rate_mbps: float) -> None:
        """Copy every block of every disk of ``key`` not local yet, disk after disk, at
        ``rate_mbps`` (Mbit/s of pack bytes; 0: unlimited); the guest's reads are not
        paced. Vault errors raise; what was copied stays."""
        m = self._served(key)
        bucket = TokenBucket(Schedule.from_mbps(rate_mbps, rate_mbps)) if rate_mbps else None
        for disk in list(m.disks.values()):
            await hydrate(disk, bucket)

    async def stop(self, key: str) -> None:
        """Stop serving ``key``'s disks (their overlays stay); nothing if none are."""
        m = self._machines.pop(key, None)
        if m is None or m.task is None:
            return
        m.stopping.set()
        await asyncio.shield(m.task)

    async def close(self) -> None:
        """Stop every machine's servers (the guests' disks then fail: a restart serves
        them again)."""
        for key in list(self._machines):
            await self.stop(key)
        self._executor.shutdown(wait=True)
