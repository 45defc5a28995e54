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

What a cycle builds on is ``cycleplan.py``; the hold of the snapshot, BEGIN and the
spool are ``cyclehold.py``; the blocks are read and sent by ``sender.py`` and
``cyclesend.py``, a broken connection is resumed by ``resume.py``; ``connect.py`` opens
a connection, ``link.py`` is one (and its heartbeats).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from common.backoff import Backoff
from common.pacing import TokenBucket
from mobility import hostid, newmap
from mobility.config import MobilityConfig
from mobility.connect import connect, connect_retrying
from mobility.cyclehold import HeldCycle, HoldFacts, hold_and_send
from mobility.cycleplan import fetch_basis, plan_cycle
from mobility.cyclesend import end_cycle
from mobility.groupcycle import GroupCall, GroupOutcome
from mobility.libvirtbackup import LibvirtBackup
from mobility.link import Link
from mobility.metricsfile import AgentMetrics, CycleFacts
from mobility.resume import Conn
from mobility.sender import Progress
from mobility.snapshot import Scripts, SnapshotProvider, crash_provider
from mobility.tracker import (
    AgentState,
    DiskState,
    commit_state,
    disk_size,
    load_state,
)
from mobility.trackers import trackers_for
from mobility.verification import report_verification, verify_due

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
        self.host_id = hostid.read_host_id(cfg.host_id_file)  # the machine it runs on
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.provider = provider or provider_for(cfg)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="scan")
        self.send_limit = TokenBucket(cfg.send_schedule())
        self.trackers = trackers_for(cfg, self.provider)  # disk name -> its change tracker
        self.metrics = (AgentMetrics(cfg.machine, Path(cfg.metrics_file))
                        if cfg.metrics_file else None)
        # The file of the CA's list of revoked server certificates (a CRL, from the managed
        # agent's settings): the handshake refuses a process server whose certificate is on
        # it.
        self.revocation_list: str | None = None
        # A consistency group's point due at the next cycle (``groupcycle.py``; taken by
        # that cycle), and the outcome of the last one this agent took part in.
        self.group_call: GroupCall | None = None
        self.last_group: GroupOutcome | None = None
        # The scan thread holds the GIL between reads: a 1 ms switch interval (instead
        # of 5) keeps the event loop sending meanwhile. Process-wide, only ever lowered.
        if sys.getswitchinterval() > 0.001:
            sys.setswitchinterval(0.001)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        for t in self.trackers.values():
            t.close()

    async def _connect_retrying(self) -> Link:
        return await connect_retrying(self.cfg, self.revocation_list)

    async def _connect(self) -> Link:
        return await connect(self.cfg, self.revocation_list)

    async def replicate_once(self, progress: Progress | None = None, *,
                             on_kind: Callable[[str], None] | None = None,
                             resync: bool = False,
                             basis_point: str | None = None) -> CycleResult:
        """One cycle: a full copy, a delta on the agent's own maps, or (``resync``, or
        when the maps or the server's base are lost, or the state directory was made on
        another machine) a delta on the vault's newest point, or on ``basis_point``
        when one is given.

        ``on_kind`` learns which, before the first block is read."""
        start, facts = time.monotonic(), HoldFacts()
        try:
            r = await self._replicate_once(progress, on_kind, resync, facts, basis_point)
        except Exception as e:
            if self.metrics is not None:
                self.metrics.cycle_failed(type(e).__name__)
            raise
        if self.metrics is not None:
            state = load_state(self.state_dir)
            disks = state.disks if state is not None else {}
            self.metrics.cycle_done(CycleFacts(
                r.kind, r.consistency, time.time(), time.monotonic() - start, facts.held,
                r.blocks_sent, r.bytes_sent, r.bytes_read, r.tracking, r.fallbacks,
                tuple(r.missed), {k: d.missed_blocks for k, d in disks.items()},
                {k: d.verified_at for k, d in disks.items()}, r.spooled_bytes,
                r.spool_overflow))
        return r

    async def _replicate_once(self, progress: Progress | None,
                              on_kind: Callable[[str], None] | None,
                              resync: bool, facts: HoldFacts,
                              basis_point: str | None = None) -> CycleResult:
        cfg = self.cfg
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = load_state(self.state_dir)
        if (made_on := hostid.moved(self.state_dir, self.host_id)) is not None:
            log.warning("agent_state_from_another_machine", made_on=made_on,
                        host_id=self.host_id, hint="its fingerprint maps are that machine's: "
                        "this cycle compares the disks with a point in the vault instead")
            resync = True
        sizer = getattr(self.provider, "disk_sizes", None)  # libvirt: the guest's sizes
        sizes = await sizer() if sizer is not None else {
            d["name"]: disk_size(d["path"]) for d in cfg.disks}
        plan = plan_cycle(cfg, self.state_dir, state, sizes, resync)
        due = verify_due(cfg.tracker_verify_hours, state)
        conn = Conn(await self._connect_retrying())
        try:
            if plan.full:
                plan = await fetch_basis(conn.link, cfg, sizes, basis_point) or plan
            c = await hold_and_send(self, conn, plan, sizes, progress, on_kind, due, facts)
            resumes = c.resumes + await end_cycle(self._connect, cfg, conn, c.sender,
                                                  c.created)
        finally:
            await conn.link.close()
        # Acknowledged: only now does the agent advance its own state.
        self._commit(state, sizes, c)
        sender = c.sender
        log.info("cycle_committed", cycle=c.cycle, kind=c.plan.kind, consistency=c.consistency,
                 blocks=sender.sent, bytes=sender.nbytes, resumes=resumes,
                 bytes_read=sender.nread, tracking=sender.tracking)
        return CycleResult(c.cycle, c.plan.full, c.consistency, sender.sent, sender.nbytes,
                           resumes, c.plan.kind, sender.nread, sender.tracking,
                           sender.fallbacks, {k: len(v) for k, v in sender.missed.items()},
                           facts.spooled, facts.overflow, facts.held)

    def _commit(self, state: AgentState | None, sizes: dict[str, int], c: HeldCycle) -> None:
        """The new fingerprint maps and ``state.json``: the cycle ``c`` acknowledged."""
        cfg, sender, disks = self.cfg, c.sender, {}
        whole, wall = sender.read_whole(), time.time()
        for d in sender.disks:
            name = newmap.finish(self.state_dir, d.name, c.cycle, d.fps)
            before = state.disks.get(d.name) if state is not None else None
            disks[d.name] = DiskState(
                sizes[d.name], cfg.block_size, name,
                verified_at=wall if d.name in whole else (before.verified_at if before else 0.0),
                # sticky until a verification scan finds the tracker whole again
                missed_blocks=len(sender.missed[d.name]) if d.name in sender.missed else (
                    before.missed_blocks if before else 0))
        commit_state(self.state_dir, AgentState(c.cycle, disks))
        hostid.record(self.state_dir, self.host_id)
        report_verification(sender, c.cycle)

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
