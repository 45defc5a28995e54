"""The agent's replication cycle: scan, send over mutual TLS, commit after the ack."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from mobility.config import MobilityConfig
from mobility.snapshot import FsFreeze, NoSnapshot, Quiesced, Scripts, SnapshotProvider
from mobility.tracker import (
    AgentState,
    DiskState,
    chunks,
    commit_state,
    data_extents,
    disk_size,
    load_map,
    load_state,
    scan_chunk,
    write_map,
)
from procserver.wire import (
    FrameType,
    ProtocolError,
    block_frame_parts,
    encode_json,
    raise_if_error,
    read_frame,
)
from vault.digest import digest_of_fingerprint_map
from vault.point import now_iso

log = structlog.get_logger("mobility")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CycleResult:
    cycle: str
    full: bool
    consistency: str
    blocks_sent: int
    bytes_sent: int


def provider_for(cfg: MobilityConfig) -> SnapshotProvider:
    inner: SnapshotProvider = NoSnapshot()
    if cfg.snapshot == "quiesced":
        inner = Quiesced()
    elif cfg.snapshot == "fsfreeze" or (cfg.snapshot == "script" and cfg.freeze_mounts):
        inner = FsFreeze(cfg.freeze_mounts)
    if cfg.snapshot == "script":
        return Scripts(cfg.pre_script, cfg.post_script, cfg.script_timeout_seconds, inner)
    return inner


def client_ssl_context(cfg: MobilityConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.tls_ca)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Agent:
    def __init__(self, cfg: MobilityConfig, provider: SnapshotProvider | None = None) -> None:
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.provider = provider or provider_for(cfg)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="scan")

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    async def replicate_once(self, progress: Progress | None = None) -> CycleResult:
        cfg = self.cfg
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = load_state(self.state_dir)
        sizes = {d["name"]: disk_size(d["path"]) for d in cfg.disks}
        olds: dict[str, bytes | None] = {}
        full = state is None
        for d in cfg.disks:
            ds = state.disks.get(d["name"]) if state else None
            if ds is None or ds.size != sizes[d["name"]] or ds.block_size != cfg.block_size:
                full = True
                olds[d["name"]] = None
            else:
                olds[d["name"]] = load_map(self.state_dir, ds)
                full = full or olds[d["name"]] is None
        async with asyncio.timeout(cfg.connect_timeout_seconds):
            reader, writer = await asyncio.open_connection(
                cfg.server_host, cfg.server_port, ssl=client_ssl_context(cfg),
                server_hostname=cfg.server_host)
        try:
            writer.write(encode_json(FrameType.HELLO, {"machine": cfg.machine,
                                                       "agent_version": "0.1.0"}))
            welcome = await read_frame(reader, timeout=cfg.connect_timeout_seconds)
            raise_if_error(welcome)
            async with self.provider.hold() as consistency:
                created = now_iso()
                cycle = uuid.uuid4().hex
                doc = {"cycle": cycle, "full": full, "consistency": consistency,
                       "base": None if full or state is None else state.last_cycle,
                       "disks": [{"name": d["name"], "size": sizes[d["name"]],
                                  "block_size": cfg.block_size} for d in cfg.disks]}
                writer.write(encode_json(FrameType.BEGIN, doc))
                ready = await read_frame(reader, timeout=cfg.connect_timeout_seconds)
                if ready.type == FrameType.ERROR and ready.json().get("code") == "resync_required":
                    log.warning("resync_required", reason=ready.json().get("message"))
                    full, cycle = True, uuid.uuid4().hex
                    doc.update(cycle=cycle, full=True, base=None)
                    writer.write(encode_json(FrameType.BEGIN, doc))
                    ready = await read_frame(reader, timeout=cfg.connect_timeout_seconds)
                raise_if_error(ready)
                if ready.type != FrameType.READY:
                    raise ProtocolError("expected_ready", f"got {ready.type.name}")
                digests, new_maps, sent, nbytes = {}, {}, 0, 0
                for idx, d in enumerate(cfg.disks):
                    fps, s, b = await self._send_disk(
                        writer, idx, d["name"], d["path"], sizes[d["name"]],
                        None if full else olds[d["name"]], full, progress)
                    digests[d["name"]] = digest_of_fingerprint_map(fps)
                    new_maps[d["name"]] = fps
                    sent, nbytes = sent + s, nbytes + b
            writer.write(encode_json(FrameType.END, {"cycle": cycle, "digests": digests,
                                                     "created": created, "blocks": sent}))
            await writer.drain()
            ack = await read_frame(reader, timeout=cfg.ack_timeout_seconds)
            raise_if_error(ack)
            if ack.type != FrameType.ACK or ack.json().get("cycle") != cycle:
                raise ProtocolError("bad_ack", f"unexpected {ack.type.name} instead of ACK")
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except (OSError, TimeoutError, ssl.SSLError):
                pass
        # Acknowledged: only now does the agent advance its own state.
        disks = {}
        for d in cfg.disks:
            name = f"{d['name']}.{cycle}.fp"
            write_map(self.state_dir, name, bytes(new_maps[d["name"]]))
            disks[d["name"]] = DiskState(sizes[d["name"]], cfg.block_size, name)
        commit_state(self.state_dir, AgentState(cycle, disks))
        log.info("cycle_committed", cycle=cycle, full=full, consistency=consistency,
                 blocks=sent, bytes=nbytes)
        return CycleResult(cycle, full, consistency, sent, nbytes)

    async def _send_disk(
        self, writer: asyncio.StreamWriter, idx: int, name: str, path: str, size: int,
        old: bytes | None, full: bool, progress: Progress | None,
    ) -> tuple[bytearray, int, int]:
        bs = self.cfg.block_size
        loop = asyncio.get_running_loop()
        fd = await asyncio.to_thread(_open_ro, path)
        try:
            extents = await asyncio.to_thread(data_extents, fd, size)
            fps = bytearray(16 * ((size + bs - 1) // bs))
            work = list(chunks(size, bs))
            sent = nbytes = 0

            def submit(i: int) -> asyncio.Future[list[tuple[int, bytes | None]]]:
                first, count = work[i]
                return loop.run_in_executor(self.executor, scan_chunk, fd, size, bs, first,
                                            count, old, extents, fps, full)

            nxt = submit(0) if work else None
            for i in range(len(work)):
                assert nxt is not None
                changes = await nxt
                nxt = submit(i + 1) if i + 1 < len(work) else None
                for n, data in changes:
                    if data is None:
                        writer.writelines(block_frame_parts(FrameType.ZERO, idx, n))
                    else:
                        writer.writelines(block_frame_parts(FrameType.BLOCK, idx, n, data))
                        nbytes += len(data)
                    sent += 1
                await writer.drain()
                if progress is not None:
                    first, count = work[i]
                    progress(name, min(size, (first + count) * bs), size)
            return fps, sent, nbytes
        finally:
            await asyncio.to_thread(_close, fd)

    async def run_forever(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.replicate_once()
                delay = 1.0
                await asyncio.sleep(self.cfg.interval_seconds)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the daemon must keep protecting the machine
                log.warning("cycle_failed", error=str(e) or type(e).__name__,
                            error_type=type(e).__name__, retry_in_seconds=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)


def _open_ro(path: str) -> int:
    import os
    import stat

    fd = os.open(path, os.O_RDONLY)
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        # A filesystem writes file data to the device beneath the block device's own page
        # cache: pages cached by our previous scan would be stale. Drop them first.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def _close(fd: int) -> None:
    import os

    os.close(fd)
