"""The agent's replication cycle: scan, send over mutual TLS, commit after the ack.

With a process server that speaks them (WELCOME ``features``), two more things:

- **Heartbeats.** Both sides send a HEARTBEAT when they have sent nothing else for
  ``heartbeat_seconds``, so silence longer than the server's idle timeout means a
  dead peer, never a slow one (a long pre-script, a server slowed down by a full
  cache): the agent then drops the connection, even in the middle of a blocked send.
- **Resume.** When the connection breaks in the middle of a cycle (reset, close,
  silence, a process-server restart), the agent reconnects, sends ``RESUME``, and
  goes on after the position the server names: blocks the server already holds
  durably are not sent again (they are re-read only if they shared a chunk). All
  of this happens while the snapshot is still held, so a resumed cycle is as
  consistent as an uninterrupted one; before the hold is released a SYNC makes
  every block durable, after it only END is left to resend. The agent keeps trying
  for ``resume_timeout_seconds`` (a server that refuses connections outright, for
  ``REFUSED_GRACE`` seconds), then the cycle fails and the next one starts over.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import ssl
import stat
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from mobility.config import MobilityConfig
from mobility.snapshot import FsFreeze, NoSnapshot, Quiesced, Scripts, SnapshotProvider
from mobility.tracker import (
    CHUNK,
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
    FEATURES,
    HEARTBEAT_FRAME,
    Frame,
    FrameType,
    ProtocolError,
    RemoteError,
    block_frame_parts,
    encode_json,
    features_of,
    raise_if_error,
    read_frame,
)
from vault.digest import digest_of_fingerprint_map
from vault.point import now_iso

log = structlog.get_logger("mobility")
Progress = Callable[[str, int, int], None]
AGENT_VERSION = "0.1.0"
REFUSED_GRACE = 5.0  # seconds of "connection refused" after which a resume gives up
WRITE_HIGH_WATER = 2 * CHUNK  # bytes queued on the connection before a send waits
PREFETCH = 3  # chunks scanned ahead of the one being sent
_FOREVER = 10.0 * 365 * 86400  # "no timeout" for read_frame


@dataclass(frozen=True)
class CycleResult:
    cycle: str
    full: bool
    consistency: str
    blocks_sent: int
    bytes_sent: int  # block data written to the network, a resend after a resume included
    resumes: int = 0


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


def _broken(e: BaseException) -> bool:
    """The connection failed (a resume may help), as opposed to a refusal or bad data."""
    if isinstance(e, ProtocolError):
        return e.code in ("timeout", "truncated")
    return isinstance(e, ConnectionError | OSError | ssl.SSLError | TimeoutError |
                      asyncio.IncompleteReadError)


class Link:
    """One connection to the process server: frames out, frames in, heartbeats."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 welcome: dict[str, Any]) -> None:
        self.reader, self.writer = reader, writer
        self.features = features_of(welcome)
        self.heartbeat = "heartbeat" in self.features
        self.resumable = "resume" in self.features
        # The server's idle timeout: silence this long (no frame, no heartbeat) is death.
        self.idle = min(3600.0, max(0.2, float(welcome.get("idle_timeout_seconds") or 60)))
        self.every = min(self.idle / 2, max(0.05, float(welcome.get("heartbeat_seconds") or 15)))
        self.last_sent = time.monotonic()
        self._frames: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self._error: BaseException | None = None
        # An ERROR the server sent that nobody has read yet: why the connection ended.
        self.remote_error: RemoteError | None = None
        self._waiting = 0  # recv() calls waiting for an answer
        self._tasks = [asyncio.create_task(self._read())]
        if self.heartbeat:
            self._tasks.append(asyncio.create_task(self._beat()))
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    async def _read(self) -> None:
        try:
            while True:
                f = await read_frame(self.reader, timeout=self.idle if self.heartbeat
                                     else _FOREVER)
                if f.type == FrameType.ERROR:
                    try:
                        raise_if_error(f)
                    except RemoteError as e:
                        self.remote_error = e
                    except ProtocolError:
                        pass
                    if not self._waiting:  # not an answer: the server ends the session
                        self._frames.put_nowait(f)
                        self._error = ConnectionResetError("the process server ended the "
                                                           "session")
                        self._frames.put_nowait(self._error)
                        self.writer.transport.abort()  # a blocked send fails now
                        return
                if f.type != FrameType.HEARTBEAT:
                    self._frames.put_nowait(f)
        except Exception as e:
            if isinstance(e, ProtocolError) and e.code == "timeout":
                e = ProtocolError("timeout", f"nothing from the process server for "
                                             f"{self.idle:g}s (not even a heartbeat)")
            self._error = e
            self._frames.put_nowait(e)
            self.writer.transport.abort()  # a send blocked on a dead peer fails now

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.last_sent + self.every - time.monotonic()))
            if time.monotonic() - self.last_sent >= self.every:
                if self.writer.transport.is_closing():
                    return
                self.writer.write(HEARTBEAT_FRAME)
                self.last_sent = time.monotonic()

    def send(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self.writer.transport.is_closing():
            raise ConnectionResetError("the connection to the process server is closed")
        self.writer.write(data)
        self.last_sent = time.monotonic()

    async def drain(self) -> None:
        await self.writer.drain()
        if self._error is not None:
            raise self._error

    async def recv(self, timeout: float) -> Frame:
        """The next frame that is not a heartbeat, within ``timeout`` seconds."""
        self._waiting += 1
        try:
            async with asyncio.timeout(timeout):
                item = await self._frames.get()
        except TimeoutError:
            raise ProtocolError("timeout", f"no answer from the process server within "
                                           f"{timeout:g}s") from None
        finally:
            self._waiting -= 1
        if isinstance(item, BaseException):
            self._frames.put_nowait(item)  # every later call fails the same way
            raise item
        if item.type == FrameType.ERROR:
            self.remote_error = None  # read: the caller deals with it
        return item

    def why(self, e: BaseException) -> BaseException:
        """The server's own explanation of a failure, if it sent one."""
        return self.remote_error or e

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


@dataclass
class _Disk:
    idx: int
    name: str
    path: str
    size: int
    old: bytes | None
    fps: bytearray = field(default_factory=bytearray)
    fd: int = -1
    extents: list[tuple[int, int]] | None = None


def _scan_frames(fd: int, size: int, bs: int, first: int, count: int, old: bytes | None,
                 extents: list[tuple[int, int]], fps: bytearray, full: bool, idx: int
                 ) -> tuple[bytes, int, int, int]:
    """Scan a chunk (worker thread) and encode its changed blocks as one run of frames.

    Returns the frames, how many, their data bytes and the last block number (-1: none).
    """
    parts: list[bytes | memoryview] = []
    nbytes, last = 0, -1
    changes = scan_chunk(fd, size, bs, first, count, old, extents, fps, full)
    for n, data in changes:
        if data is None:
            parts.extend(block_frame_parts(FrameType.ZERO, idx, n))
        else:
            parts.extend(block_frame_parts(FrameType.BLOCK, idx, n, data))
            nbytes += len(data)
        last = n
    return b"".join(parts), len(changes), nbytes, last


class _Sender:
    """The blocks of one cycle, sent in (disk, block) order; restartable after a position."""

    def __init__(self, agent: Agent, disks: list[_Disk], full: bool,
                 progress: Progress | None) -> None:
        self.agent, self.disks, self.full, self.progress = agent, disks, full, progress
        self.bs = agent.cfg.block_size
        self.sent = 0  # frames the server has (after a resume: its count) plus those since
        self.nbytes = 0
        self.last: tuple[int, int] | None = None
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def open(self) -> None:
        for d in self.disks:
            d.fd = await asyncio.to_thread(_open_ro, d.path)
            d.fps = bytearray(16 * ((d.size + self.bs - 1) // self.bs))

    async def close(self) -> None:
        await self._settle()
        for d in self.disks:
            if d.fd >= 0:
                await asyncio.to_thread(os.close, d.fd)
                d.fd = -1

    async def _settle(self) -> None:
        while self._pending:
            with contextlib.suppress(Exception):
                await self._pending.popleft()

    def rewind(self, blocks: int, position: tuple[int, int] | None) -> None:
        self.sent, self.last = blocks, position

    async def send(self, link: Link) -> None:
        """Send every block after ``self.last``."""
        await self._settle()
        loop = asyncio.get_running_loop()
        bs = self.bs
        for d in self.disks:
            if self.last is not None and d.idx < self.last[0]:
                continue
            start = self.last[1] + 1 if self.last is not None and d.idx == self.last[0] else 0
            if d.extents is None:
                d.extents = await asyncio.to_thread(data_extents, d.fd, d.size)
            per = max(1, CHUNK // bs)
            work = [(f, c) for f, c in chunks(d.size, bs) if f + c > start]
            if work and work[0][0] < start:  # the first chunk only from ``start`` on
                f, c = work[0]
                work[0] = (start, f + c - start)
            assert all(c <= per for _f, c in work)

            def submit(i: int, d: _Disk = d, work: list[tuple[int, int]] = work
                       ) -> asyncio.Future[tuple[bytes, int, int, int]]:
                first, count = work[i]
                assert d.extents is not None
                return loop.run_in_executor(
                    self.agent.executor, _scan_frames, d.fd, d.size, bs, first, count,
                    None if self.full else d.old, d.extents, d.fps, self.full, d.idx)

            ahead = collections.deque(submit(i) for i in range(min(PREFETCH, len(work))))
            self._pending = ahead
            for i in range(len(work)):
                data, frames, nbytes, last = await ahead.popleft()
                if i + PREFETCH < len(work):
                    ahead.append(submit(i + PREFETCH))
                if frames:
                    link.send(data)
                    self.sent += frames
                    self.nbytes += nbytes
                    self.last = (d.idx, last)
                    await link.drain()
                if self.progress is not None:
                    first, count = work[i]
                    self.progress(d.name, min(d.size, (first + count) * bs), d.size)

    def digests(self) -> dict[str, str]:
        return {d.name: digest_of_fingerprint_map(d.fps) for d in self.disks}


class Agent:
    def __init__(self, cfg: MobilityConfig, provider: SnapshotProvider | None = None) -> None:
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.provider = provider or provider_for(cfg)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="scan")
        # The scan thread holds the GIL between reads: a 1 ms switch interval (instead
        # of 5) keeps the event loop sending meanwhile. Process-wide, only ever lowered.
        if sys.getswitchinterval() > 0.001:
            sys.setswitchinterval(0.001)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    async def _connect_retrying(self) -> Link:
        """Connect, retrying for up to ``connect_timeout_seconds`` while the server is
        there but refuses for now: busy, or the connection reset before the TLS handshake
        ended (too many handshakes at once). Nothing listening fails at once."""
        deadline = time.monotonic() + self.cfg.connect_timeout_seconds
        delay = 0.05
        while True:
            try:
                return await self._connect()
            except (RemoteError, ConnectionResetError) as e:
                if isinstance(e, RemoteError) and e.code != "busy":
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 2.0)

    async def _connect(self) -> Link:
        cfg = self.cfg
        async with asyncio.timeout(cfg.connect_timeout_seconds):
            reader, writer = await asyncio.open_connection(
                cfg.server_host, cfg.server_port, ssl=client_ssl_context(cfg),
                server_hostname=cfg.server_host)
        try:
            writer.write(encode_json(FrameType.HELLO, {
                "machine": cfg.machine, "agent_version": AGENT_VERSION,
                "features": list(FEATURES)}))
            welcome = await read_frame(reader, timeout=cfg.connect_timeout_seconds)
            raise_if_error(welcome)
            if welcome.type != FrameType.WELCOME:
                raise ProtocolError("expected_welcome", f"got {welcome.type.name}")
            return Link(reader, writer, welcome.json())
        except BaseException:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 5)
            raise

    async def _resume(self, link: Link, cycle: str, error: BaseException) -> tuple[Link, Frame]:
        """The connection broke mid-cycle: reconnect and ask to resume ``cycle``."""
        await link.close()
        if not link.resumable or self.cfg.resume_timeout_seconds <= 0:
            raise error
        cfg = self.cfg
        deadline = time.monotonic() + cfg.resume_timeout_seconds
        refused_since: float | None = None
        delay = 0.1
        log.warning("connection_lost_resuming", cycle=cycle,
                    error=str(error) or type(error).__name__)
        while True:
            try:
                new = await self._connect()
                try:
                    new.send(encode_json(FrameType.RESUME, {"cycle": cycle}))
                    answer = await new.recv(cfg.connect_timeout_seconds)
                    raise_if_error(answer)
                    if answer.type not in (FrameType.PROGRESS, FrameType.ACK) or \
                            answer.json().get("cycle") != cycle:
                        raise ProtocolError("bad_resume",
                                            f"unexpected {answer.type.name} after RESUME")
                except BaseException:
                    await new.close()
                    raise
                return new, answer
            except Exception as e:
                busy = isinstance(e, RemoteError) and e.code == "busy"
                if not (busy or _broken(e)):
                    raise
                now = time.monotonic()
                if isinstance(e, ConnectionRefusedError):
                    refused_since = refused_since or now
                    if now - refused_since > REFUSED_GRACE:
                        raise
                else:
                    refused_since = None
                if now + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

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
        link = await self._connect_retrying()
        resumes = 0
        try:
            async with self.provider.hold() as consistency:
                created = now_iso()
                cycle = uuid.uuid4().hex
                doc = {"cycle": cycle, "full": full, "consistency": consistency,
                       "base": None if full or state is None else state.last_cycle,
                       "disks": [{"name": d["name"], "size": sizes[d["name"]],
                                  "block_size": cfg.block_size} for d in cfg.disks]}
                link.send(encode_json(FrameType.BEGIN, doc))
                ready = await link.recv(cfg.connect_timeout_seconds)
                if ready.type == FrameType.ERROR and ready.json().get("code") == "resync_required":
                    log.warning("resync_required", reason=ready.json().get("message"))
                    full, cycle = True, uuid.uuid4().hex
                    doc.update(cycle=cycle, full=True, base=None)
                    link.send(encode_json(FrameType.BEGIN, doc))
                    ready = await link.recv(cfg.connect_timeout_seconds)
                raise_if_error(ready)
                if ready.type != FrameType.READY:
                    raise ProtocolError("expected_ready", f"got {ready.type.name}")
                sender = _Sender(self, [
                    _Disk(i, d["name"], d["path"], sizes[d["name"]],
                          None if full else olds[d["name"]])
                    for i, d in enumerate(cfg.disks)], full, progress)
                await sender.open()
                try:
                    while True:
                        try:
                            await sender.send(link)
                            if link.resumable:
                                # Everything durable before the snapshot is let go: after
                                # it, a resume needs nothing but END.
                                link.send(encode_json(FrameType.SYNC, {"cycle": cycle}))
                                p = await link.recv(cfg.ack_timeout_seconds)
                                raise_if_error(p)
                                _check_progress(p, cycle, sender.sent, sender.last)
                            break
                        except Exception as e:
                            if not _broken(link.why(e)):
                                raise link.why(e) from e
                            link, answer = await self._resume(link, cycle, e)
                            resumes += 1
                            if answer.type != FrameType.PROGRESS:
                                raise ProtocolError("bad_resume", "the process server says "
                                                    "a cycle still being sent is complete"
                                                    ) from e
                            blocks, position = _progress_of(answer)
                            log.info("cycle_resumed", cycle=cycle, blocks=blocks,
                                     position=position, sent_before=sender.sent)
                            sender.rewind(blocks, position)
                    digests = sender.digests()
                    new_maps = {d.name: d.fps for d in sender.disks}
                finally:
                    await sender.close()
            end = encode_json(FrameType.END, {"cycle": cycle, "digests": digests,
                                              "created": created, "blocks": sender.sent})
            while True:
                try:
                    link.send(end)
                    await link.drain()
                    ack = await link.recv(cfg.ack_timeout_seconds)
                    raise_if_error(ack)
                    if ack.type != FrameType.ACK or ack.json().get("cycle") != cycle:
                        raise ProtocolError("bad_ack", f"unexpected {ack.type.name} instead "
                                                       "of ACK")
                    break
                except Exception as e:
                    if not _broken(link.why(e)):
                        raise link.why(e) from e
                    link, answer = await self._resume(link, cycle, e)
                    resumes += 1
                    if answer.type == FrameType.ACK:
                        break  # END had arrived; only its ACK was lost
                    # Everything was durable (SYNC): only END needs sending again.
                    _check_progress(answer, cycle, sender.sent, sender.last)
        finally:
            await link.close()
        # Acknowledged: only now does the agent advance its own state.
        disks = {}
        for d in cfg.disks:
            name = f"{d['name']}.{cycle}.fp"
            write_map(self.state_dir, name, bytes(new_maps[d["name"]]))
            disks[d["name"]] = DiskState(sizes[d["name"]], cfg.block_size, name)
        commit_state(self.state_dir, AgentState(cycle, disks))
        log.info("cycle_committed", cycle=cycle, full=full, consistency=consistency,
                 blocks=sender.sent, bytes=sender.nbytes, resumes=resumes)
        return CycleResult(cycle, full, consistency, sender.sent, sender.nbytes, resumes)

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


def _progress_of(frame: Frame) -> tuple[int, tuple[int, int] | None]:
    doc = frame.json()
    blocks, pos = doc.get("blocks"), doc.get("position")
    if not isinstance(blocks, int) or blocks < 0:
        raise ProtocolError("bad_progress", "PROGRESS needs a block count")
    if pos is None:
        return blocks, None
    if not (isinstance(pos, list) and len(pos) == 2 and all(isinstance(x, int) for x in pos)):
        raise ProtocolError("bad_progress", "PROGRESS position must be [disk, block] or null")
    return blocks, (pos[0], pos[1])


def _check_progress(frame: Frame, cycle: str, sent: int, last: tuple[int, int] | None) -> None:
    if frame.type != FrameType.PROGRESS or frame.json().get("cycle") != cycle:
        raise ProtocolError("bad_progress", f"unexpected {frame.type.name} instead of PROGRESS")
    if _progress_of(frame) != (sent, last):
        raise ProtocolError("bad_progress",
                            f"the process server holds {_progress_of(frame)} of the cycle, "
                            f"the agent sent {(sent, last)}")


def _open_ro(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        # A filesystem writes file data to the device beneath the block device's own page
        # cache: pages cached by our previous scan would be stale. Drop them first.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd
