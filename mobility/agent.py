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

The blocks are read and sent by ``sender.py``, a broken connection is resumed by
``resume.py``; ``link.py`` is one connection (and its heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from common.backoff import Backoff
from common.digest import block_count
from common.pacing import TokenBucket
from common.timefmt import now_iso
from mobility import AGENT_VERSION
from mobility.agenttls import client_ssl_context, revoked_refusal
from mobility.config import MobilityConfig
from mobility.libvirtbackup import LibvirtBackup
from mobility.link import FOREVER, Link, broken
from mobility.metricsfile import AgentMetrics, CycleFacts
from mobility.resume import Conn, check_progress, progress_of, resume
from mobility.sender import CycleDisk, Progress, Sender
from mobility.snapshot import Held, Scripts, SnapshotProvider, crash_provider, held
from mobility.spool import fill
from mobility.tracker import (
    AgentState,
    DiskState,
    commit_state,
    disk_size,
    load_map,
    load_state,
    write_map,
)
from mobility.trackers import trackers_for
from mobility.verification import report_verification, verify_due
from wire.protocol import (
    FEATURES,
    FINGERPRINT,
    Frame,
    FrameType,
    ProtocolError,
    RemoteError,
    encode_json,
    raise_if_error,
    read_frame,
)

log = structlog.get_logger("mobility")


@dataclass(frozen=True)
class CycleResult:
    cycle: str
    full: bool
    consistency: str
    blocks_sent: int
    bytes_sent: int  # block data written to the network, a resend after a resume included
    resumes: int = 0
    kind: str = "delta"  # "full", "delta" (on the agent's own map), "resync" (on the vault's)
    bytes_read: int = 0  # read from the disks (snapshots) to find and send the changes
    tracking: dict[str, str] = field(default_factory=dict)  # disk -> "scan", "reflink"...
    fallbacks: dict[str, str] = field(default_factory=dict)  # disk -> why a tracker scanned
    # disk -> changed blocks its tracker had missed, for the disks this cycle verified
    missed: dict[str, int] = field(default_factory=dict)
    spooled_bytes: int = 0  # copied to the spool while frozen, then sent after the thaw
    spool_overflow: bool = False  # too much to spool: sent while the disks were held
    held_seconds: float = 0.0  # the snapshot held (fsfreeze: frozen) until the thaw


@dataclass(frozen=True)
class _Plan:
    """What a cycle compares the disks against: nothing (full), the agent's own maps
    (delta), or the fingerprints of the vault's newest point (resync)."""

    kind: str
    base: str | None
    olds: dict[str, bytes | None]

    @property
    def full(self) -> bool:
        return self.kind == "full"


class _Retry(Exception):
    """The process server does not know the base: leave the hold, fetch a basis."""


def provider_for(cfg: MobilityConfig) -> SnapshotProvider:
    if cfg.snapshot == "libvirt":
        return LibvirtBackup(cfg.libvirt_uri, cfg.libvirt_domain, cfg.disks, cfg.state_dir,
                             cfg.libvirt_socket_dir)
    inner = crash_provider(cfg.snapshot, [d["path"] for d in cfg.disks], cfg.freeze_mounts,
                           cfg.lvm_snapshot_size)
    if cfg.snapshot == "script" or (cfg.snapshot in ("lvm", "reflink") and cfg.pre_script
                                    and cfg.post_script):
        return Scripts(cfg.pre_script, cfg.post_script, cfg.script_timeout_seconds, inner)
    return inner


class Agent:
    def __init__(self, cfg: MobilityConfig, provider: SnapshotProvider | None = None) -> None:
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.provider = provider or provider_for(cfg)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="scan")
        self.send_limit = TokenBucket(cfg.send_schedule())
        self.trackers = trackers_for(cfg, self.provider)  # disk name -> its change tracker
        self.metrics = (AgentMetrics(cfg.machine, Path(cfg.metrics_file))
                        if cfg.metrics_file else None)
        self._held = 0.0  # seconds the current cycle held its snapshot
        self._hold_start = 0.0
        self._thawed: float | None = None  # when the current hold let writes go (spool)
        self._spooled, self._overflow = 0, False  # the current cycle's spool
        # The file of the CA's list of revoked server certificates (a CRL, from the managed
        # agent's settings): the handshake refuses a process server whose certificate is on
        # it.
        self.revocation_list: str | None = None
        # The scan thread holds the GIL between reads: a 1 ms switch interval (instead
        # of 5) keeps the event loop sending meanwhile. Process-wide, only ever lowered.
        if sys.getswitchinterval() > 0.001:
            sys.setswitchinterval(0.001)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        for t in self.trackers.values():
            t.close()

    async def _connect_retrying(self) -> Link:
        """Connect, retrying for up to ``connect_timeout_seconds`` while the server is
        there but refuses for now: busy, or the connection reset before the TLS handshake
        ended (too many handshakes at once). Nothing listening fails at once."""
        deadline = time.monotonic() + self.cfg.connect_timeout_seconds
        # Jittered: many agents refused at once must not all come back in step.
        backoff = Backoff(0.05, 2.0)
        while True:
            try:
                return await self._connect()
            except (RemoteError, ConnectionResetError) as e:
                if isinstance(e, RemoteError) and e.code != "busy":
                    raise
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)

    async def _connect(self) -> Link:
        cfg = self.cfg
        server = f"{cfg.server_host}:{cfg.server_port}"
        try:
            async with asyncio.timeout(cfg.connect_timeout_seconds):
                reader, writer = await asyncio.open_connection(
                    cfg.server_host, cfg.server_port,
                    ssl=client_ssl_context(cfg, self.revocation_list),
                    server_hostname=cfg.server_host)
        except ssl.SSLCertVerificationError as e:
            refusal = revoked_refusal(e, server)
            if refusal is None:
                raise
            log.error("server_certificate_revoked", server=server, error=str(refusal))
            raise refusal from None
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

    def _plan(self, state: AgentState | None, sizes: dict[str, int], resync: bool) -> _Plan:
        """A delta on the agent's own maps if it has them all, for this layout."""
        cfg = self.cfg
        full = _Plan("full", None, dict.fromkeys(sizes))
        if state is None or resync:
            return full
        olds: dict[str, bytes | None] = {}
        for d in cfg.disks:
            ds = state.disks.get(d["name"])
            if ds is None or ds.size != sizes[d["name"]] or ds.block_size != cfg.block_size:
                return full
            olds[d["name"]] = load_map(self.state_dir, ds)
            if olds[d["name"]] is None:
                return full
        return _Plan("delta", state.last_cycle, olds)

    async def _basis(self, link: Link, sizes: dict[str, int]) -> _Plan | None:
        """Ask for the fingerprints of the vault's newest point of this machine; None if
        the process server has none to offer (the cycle is then a full one)."""
        if "resync" not in link.features:
            return None
        cfg, bs = self.cfg, self.cfg.block_size
        disks = [{"name": d["name"], "size": sizes[d["name"]], "block_size": bs}
                 for d in cfg.disks]
        link.send(encode_json(FrameType.BASIS, {"disks": disks}))
        # Reading a point back takes a while; heartbeats tell a slow server from a dead one.
        wait = FOREVER if link.heartbeat else cfg.ack_timeout_seconds

        async def answer(want: FrameType) -> Frame | None:
            f = await link.recv(wait)
            if f.type == FrameType.ERROR and f.json().get("code") == "no_basis":
                log.info("resync_basis_unavailable", reason=f.json().get("message"))
                return None
            raise_if_error(f)
            if f.type != want:
                raise ProtocolError("bad_basis", f"expected {want.name}, got {f.type.name}")
            return f

        head = await answer(FrameType.BASIS)
        if head is None:
            return None
        doc = head.json()
        counts = [block_count(sizes[d["name"]], bs) for d in cfg.disks]
        if not isinstance(doc.get("cycle"), str) or doc.get("disks") != [
                {"name": d["name"], "blocks": n} for d, n in zip(cfg.disks, counts, strict=True)]:
            raise ProtocolError("bad_basis", "the BASIS answer does not describe this "
                                             "machine's disks")
        olds: dict[str, bytes | None] = {}
        for idx, (d, n) in enumerate(zip(cfg.disks, counts, strict=True)):
            fps = bytearray(FINGERPRINT * n)
            got = 0
            while got < n:
                f = await answer(FrameType.MAP)
                if f is None:
                    return None
                disk, first, part = f.map()
                more = len(part) // FINGERPRINT
                if disk != idx or first != got or not 0 < more <= n - got:
                    raise ProtocolError("bad_map", f"MAP {disk}:{first}+{more} out of order "
                                                   f"(expected disk {idx} from block {got})")
                fps[FINGERPRINT * got:FINGERPRINT * (got + more)] = part
                got += more
            olds[d["name"]] = bytes(fps)
        log.info("resync_basis_received", point=doc.get("point"), cycle=doc["cycle"])
        return _Plan("resync", doc["cycle"], olds)

    async def _begin(self, link: Link, plan: _Plan, doc: dict[str, Any]) -> _Plan:
        """BEGIN the cycle ``doc`` on ``plan``; READY, or the plan it ended up on."""
        cfg = self.cfg
        doc.update(full=plan.full, base=plan.base)
        link.send(encode_json(FrameType.BEGIN, doc))
        ready = await link.recv(cfg.connect_timeout_seconds)
        if ready.type == FrameType.ERROR and ready.json().get("code") == "resync_required":
            log.warning("resync_required", reason=ready.json().get("message"), plan=plan.kind)
            if plan.kind == "delta" and "resync" in link.features:
                raise _Retry
            plan = _Plan("full", None, dict.fromkeys(plan.olds))
            doc.update(cycle=uuid.uuid4().hex, full=True, base=None)
            link.send(encode_json(FrameType.BEGIN, doc))
            ready = await link.recv(cfg.connect_timeout_seconds)
        raise_if_error(ready)
        if ready.type != FrameType.READY:
            raise ProtocolError("expected_ready", f"got {ready.type.name}")
        return plan

    async def replicate_once(self, progress: Progress | None = None, *,
                             on_kind: Callable[[str], None] | None = None,
                             resync: bool = False) -> CycleResult:
        """One cycle: a full copy, a delta on the agent's own maps, or (``resync``, or
        when the maps or the server's base are lost) a delta on the vault's newest point.

        ``on_kind`` learns which, before the first block is read."""
        start, self._held = time.monotonic(), 0.0
        self._spooled, self._overflow = 0, False
        try:
            r = await self._replicate_once(progress, on_kind, resync)
        except Exception as e:
            if self.metrics is not None:
                self.metrics.cycle_failed(type(e).__name__)
            raise
        if self.metrics is not None:
            state = load_state(self.state_dir)
            disks = state.disks if state is not None else {}
            self.metrics.cycle_done(CycleFacts(
                r.kind, r.consistency, time.time(), time.monotonic() - start, self._held,
                r.blocks_sent, r.bytes_sent, r.bytes_read, r.tracking, r.fallbacks,
                tuple(r.missed), {k: d.missed_blocks for k, d in disks.items()},
                {k: d.verified_at for k, d in disks.items()}, r.spooled_bytes,
                r.spool_overflow))
        return r

    async def _replicate_once(self, progress: Progress | None,
                              on_kind: Callable[[str], None] | None,
                              resync: bool) -> CycleResult:
        cfg = self.cfg
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = load_state(self.state_dir)
        sizer = getattr(self.provider, "disk_sizes", None)  # libvirt: the guest's sizes
        sizes = await sizer() if sizer is not None else {
            d["name"]: disk_size(d["path"]) for d in cfg.disks}
        plan = self._plan(state, sizes, resync)
        due = verify_due(cfg.tracker_verify_hours, state)
        conn = Conn(await self._connect_retrying())
        resumes = 0
        try:
            if plan.full:
                plan = await self._basis(conn.link, sizes) or plan
            while True:
                held_from = self._hold_start = time.monotonic()
                self._thawed = None
                try:
                    async with self.provider.hold() as h:
                        snap = held(h)
                        consistency = snap.label
                        created = now_iso()
                        doc: dict[str, Any] = {
                            "cycle": uuid.uuid4().hex, "consistency": consistency,
                            "disks": [{"name": d["name"], "size": sizes[d["name"]],
                                       "block_size": cfg.block_size} for d in cfg.disks]}
                        plan = await self._begin(conn.link, plan, doc)
                        cycle = doc["cycle"]
                        if on_kind is not None:
                            on_kind(plan.kind)
                        sender, resumes = await self._send(conn, plan, doc, progress, snap,
                                                           due)
                    self._held += (self._thawed or time.monotonic()) - held_from
                    break
                except _Retry:
                    self._held += time.monotonic() - held_from
                    plan = await self._basis(conn.link, sizes) or _Plan(
                        "full", None, dict.fromkeys(sizes))
            digests = sender.digests()
            end = encode_json(FrameType.END, {"cycle": cycle, "digests": digests,
                                              "created": created, "blocks": sender.sent})
            while True:
                try:
                    conn.link.send(end)
                    await conn.link.drain()
                    ack = await conn.link.recv(cfg.ack_timeout_seconds)
                    raise_if_error(ack)
                    if ack.type != FrameType.ACK or ack.json().get("cycle") != cycle:
                        raise ProtocolError("bad_ack", f"unexpected {ack.type.name} instead "
                                                       "of ACK")
                    break
                except Exception as e:
                    if not broken(conn.link.why(e)):
                        raise conn.link.why(e) from e
                    answer = await resume(self._connect, cfg, conn, cycle, e)
                    resumes += 1
                    if answer.type == FrameType.ACK:
                        break  # END had arrived; only its ACK was lost
                    # Everything was durable (SYNC): only END needs sending again.
                    check_progress(answer, cycle, sender.sent, sender.last)
        finally:
            await conn.link.close()
        # Acknowledged: only now does the agent advance its own state.
        disks = {}
        whole, wall = sender.read_whole(), time.time()
        for d in sender.disks:
            name = f"{d.name}.{cycle}.fp"
            write_map(self.state_dir, name, bytes(d.fps))
            before = state.disks.get(d.name) if state is not None else None
            disks[d.name] = DiskState(
                sizes[d.name], cfg.block_size, name,
                verified_at=wall if d.name in whole else (before.verified_at if before else 0.0),
                # sticky until a verification scan finds the tracker whole again
                missed_blocks=len(sender.missed[d.name]) if d.name in sender.missed else (
                    before.missed_blocks if before else 0))
        commit_state(self.state_dir, AgentState(cycle, disks))
        report_verification(sender, cycle)
        log.info("cycle_committed", cycle=cycle, kind=plan.kind, consistency=consistency,
                 blocks=sender.sent, bytes=sender.nbytes, resumes=resumes,
                 bytes_read=sender.nread, tracking=sender.tracking)
        return CycleResult(cycle, plan.full, consistency, sender.sent, sender.nbytes, resumes,
                           plan.kind, sender.nread, sender.tracking, sender.fallbacks,
                           {k: len(v) for k, v in sender.missed.items()}, self._spooled,
                           self._overflow, self._held)

    async def _send(self, conn: Conn, plan: _Plan, doc: dict[str, Any],
                    progress: Progress | None, snap: Held,
                    verify: frozenset[str] = frozenset()) -> tuple[Sender, int]:
        """Send every changed block of the cycle (resuming after broken connections) and,
        with ``resume``, make it durable: after this only END is left."""
        cfg, cycle, resumes = self.cfg, doc["cycle"], 0
        sender = Sender(self, [
            CycleDisk(i, d["name"], snap.path(d["path"]), doc["disks"][i]["size"],
                  plan.olds[d["name"]])
            for i, d in enumerate(cfg.disks)], plan.full, progress,
            cycle=cycle, base=plan.base if plan.kind == "delta" else None, verify=verify)
        await sender.open()
        try:
            await self._spool(sender, snap)
            while True:
                link = conn.link
                try:
                    await sender.send(link)
                    if link.resumable:
                        # Everything durable before the snapshot is let go: after it, a
                        # resume needs nothing but END.
                        link.send(encode_json(FrameType.SYNC, {"cycle": cycle}))
                        p = await link.recv(cfg.ack_timeout_seconds)
                        raise_if_error(p)
                        check_progress(p, cycle, sender.sent, sender.last)
                    return sender, resumes
                except Exception as e:
                    if not broken(link.why(e)):
                        raise link.why(e) from e
                    answer = await resume(self._connect, cfg, conn, cycle, e)
                    resumes += 1
                    if answer.type != FrameType.PROGRESS:
                        raise ProtocolError("bad_resume", "the process server says a cycle "
                                            "still being sent is complete") from e
                    blocks, position = progress_of(answer)
                    log.info("cycle_resumed", cycle=cycle, blocks=blocks, position=position,
                             sent_before=sender.sent)
                    sender.rewind(blocks, position)
        finally:
            await sender.close()

    async def _spool(self, sender: Sender, snap: Held) -> None:
        """Where the hold can thaw early (fsfreeze): copy what the cycle reads into the
        spool (``spool.py``), then thaw, so that the disks are held for the copy alone."""
        limit = self.cfg.freeze_spool_mb << 20
        if snap.thaw is None or limit == 0:
            return
        got = await asyncio.to_thread(fill, sender.disks, self.cfg.block_size, limit)
        if not got.fits:
            self._overflow = True
            # Expected for a full copy or a scan (info); a warning when a tracker's
            # changes alone outgrew the spool.
            emit = log.warning if any(d.ranges is not None for d in sender.disks) else log.info
            emit("freeze_spool_overflow", cycle=sender.cycle, read_bytes=got.nbytes,
                 spool_bytes=limit, hint="the filesystems stay frozen while this cycle is "
                 "sent: raise freeze_spool_mb or shorten interval_seconds")
            return
        await snap.thaw()
        self._thawed, self._spooled = time.monotonic(), got.nbytes
        log.info("cycle_spooled", cycle=sender.cycle, bytes=got.nbytes,
                 freeze_seconds=round(self._thawed - self._hold_start, 4))

    async def run_forever(self) -> None:
        # Without jitter, as before: one agent per machine, each on its own schedule.
        backoff = Backoff(1.0, 60.0, jitter=False)
        while True:
            try:
                await self.replicate_once()
                backoff.reset()
                await asyncio.sleep(self.cfg.interval_seconds)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the daemon must keep protecting the machine
                delay = backoff.next()
                log.warning("cycle_failed", error=str(e) or type(e).__name__,
                            error_type=type(e).__name__, retry_in_seconds=delay)
                await asyncio.sleep(delay)
