"""``mobility run`` with a configuration server: the agent as a managed daemon.

Each round the agent asks the site listener for its settings (the assigned process
server, the policy's crash-consistent interval and app-consistent frequency, the
block size, whether to replicate at all), heartbeats, runs a cycle and reports
the progress of initial replication (any cycle while the item is being enabled: a full
copy, or a delta or resync where the agent already holds a basis) and of
resynchronizations. When the
configuration server cannot be reached it keeps replicating on what it last knew:
the control plane steers the data path, it never stops it.

The settings also carry the policy's send limit (work and off hours), which replaces
mobility.toml's while the policy has one (and gives it back when it has none), and the
CA's list of revoked server certificates (a CRL), which the agent's TLS contexts then
check at every handshake, with the process server and with the site listener.

A member of a consistency group (the settings' ``group``) also wakes when each of the
group's intervals begins (counted from the UNIX epoch, so every member wakes alike) and
takes that cycle through the group's barrier on the process server (``groupcycle.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from common.backoff import Backoff
from common.fs import atomic_write
from mobility import hostid
from mobility.agent import Agent, CycleResult, provider_for
from mobility.config import MobilityConfig
from mobility.failbackrequest import answer_failback, asked_to_fail_back
from mobility.groupcycle import due_call
from mobility.inplace import failback_pending
from mobility.renewal import cert_not_after, renew
from mobility.reporter import ProgressReporter
from mobility.shutdown import answered, shut_down
from mobility.siteclient import Settings, SiteClient, SiteError, SiteRefused
from mobility.snapshot import Scripts, SnapshotProvider, crash_provider
from mobility.verification import tracker_report

log = structlog.get_logger("mobility.daemon")
CRL_FILE = "server-revocations.pem"  # in state_dir: the CA's CRL of server certificates
ENABLING = ("enabling", "initial_replication")


def providers(cfg: MobilityConfig) -> tuple[SnapshotProvider, SnapshotProvider | None]:
    """The crash-consistent provider, and the app-consistent one if scripts are set."""
    crash = provider_for(cfg) if cfg.snapshot == "libvirt" else crash_provider(
        cfg.snapshot, [d["path"] for d in cfg.disks], cfg.freeze_mounts, cfg.lvm_snapshot_size)
    app = (Scripts(cfg.pre_script, cfg.post_script, cfg.script_timeout_seconds, crash)
           if cfg.pre_script and cfg.post_script else None)
    return crash, app


class ManagedAgent:
    """The agent steered by the site listener ``site`` (a ``SiteClient`` authenticated
    with ``cfg``'s certificate). With ``config`` (the mobility.toml ``cfg`` was read
    from) it renews its certificate once fewer than ``renew_before_days`` are left,
    rewriting that file; without, it never renews. ``clock`` (monotonic) paces
    heartbeats and app-consistent points, ``wall`` is compared with the expiry."""

    def __init__(self, cfg: MobilityConfig, site: SiteClient,
                 clock: Callable[[], float] = time.monotonic, *,
                 config: Path | None = None, renew_before_days: float = 30.0,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg, self.site, self.clock = cfg, site, clock
        self.config, self.renew_before, self.wall = config, renew_before_days * 86400, wall
        self.crash, self.app = providers(cfg)
        self.agent = Agent(cfg, provider=self.crash)
        site.host_id = self.agent.host_id
        self.settings: Settings | None = None
        self._last_app: float | None = None
        self._last_heartbeat: float | None = None
        self._group_slot: int | None = None  # the group's interval of the last group point
        self.last: CycleResult | None = None  # the last acknowledged cycle
        self._revoked: frozenset[str] | None = None  # the revoked servers the CRL lists
        self._long_poll = True  # the configuration server answers settings/changes
        if self._crl_path().exists():  # revocations known before a restart still hold
            try:
                self._use_crl(str(self._crl_path()))
            except SiteError as e:
                log.warning("revocation_list_unreadable", error=str(e),
                            hint="the next settings bring the current one")

    def close(self) -> None:
        self.agent.close()

    async def renew_if_due(self) -> None:
        """Renew the certificate ahead of its expiry; a failure is logged and retried next
        round while the current certificate still works."""
        if self.config is None:
            return
        left = cert_not_after(self.cfg.tls_cert) - self.wall()
        if left > self.renew_before:
            return
        try:
            new = await renew(self.site, self.config, self.cfg.tls_cert, self.cfg.tls_key)
        except Exception as e:  # the site listener is away, say: the old one still works
            log.warning("certificate_renewal_failed", error=str(e) or type(e).__name__,
                        days_left=round(left / 86400, 1),
                        hint="retried every round; 'mobility renew' does it by hand")
            return
        # The same paths the renewal wrote into the config file.
        cert, key = str(new.cert.resolve()), str(new.key.resolve())
        self.cfg = dataclasses.replace(self.cfg, tls_cert=cert, tls_key=key)
        self.agent.cfg = dataclasses.replace(self.agent.cfg, tls_cert=cert, tls_key=key)
        log.info("certificate_renewed", cert=cert, not_after=cert_not_after(cert))

    async def refresh(self) -> Settings | None:
        try:
            s = await self.site.settings()
        except SiteError as e:
            log.warning("settings_unavailable", error=str(e),
                        hint="replicating on the last known settings")
            return self.settings
        self.settings = s
        cfg = self.cfg
        if s.process_server:
            host, _, port = s.process_server.rpartition(":")
            if host and port.isdigit():
                cfg = dataclasses.replace(cfg, server_host=host, server_port=int(port))
        if s.block_size and s.block_size != cfg.block_size:
            cfg = dataclasses.replace(cfg, block_size=s.block_size)
        if cfg != self.agent.cfg:
            log.info("settings_applied", server=f"{cfg.server_host}:{cfg.server_port}",
                     block_size=cfg.block_size)
            self.agent.cfg = cfg
        self._apply_send_limit(s)
        self._apply_revocations(s)
        return s

    def _apply_revocations(self, s: Settings) -> None:
        """Keep the CA's CRL of revoked server certificates in ``state_dir`` (it survives
        a restart) and have both TLS contexts check it."""
        # (compared by content: each list is signed anew, so its bytes always differ)
        if s.revoked_servers == self._revoked and (self._revoked or s.revocation_list is None):
            return
        crl = self._crl_path()
        if s.revocation_list is None:
            crl.unlink(missing_ok=True)
            self._use_crl(None)
        else:
            atomic_write(crl, s.revocation_list.encode())
            self._use_crl(str(crl))
        self._revoked = s.revoked_servers
        log.info("revoked_server_certificates", serials=sorted(s.revoked_servers))

    def _crl_path(self) -> Path:
        return Path(self.cfg.state_dir) / CRL_FILE

    def _use_crl(self, path: str | None) -> None:
        self.agent.revocation_list = path
        self.site.use_revocation_list(path)

    def _apply_send_limit(self, s: Settings) -> None:
        """The policy's send limit, or mobility.toml's when the policy has none."""
        schedule = s.send_limit or self.cfg.send_schedule()
        bucket = self.agent.send_limit
        if bucket.schedule != schedule:
            bucket.schedule = schedule  # the bucket starts afresh at the new rate
            log.info("send_limit_applied",
                     source="policy" if s.send_limit is not None else "mobility.toml",
                     work_bytes_per_second=schedule.work_bytes_per_second,
                     off_bytes_per_second=schedule.off_bytes_per_second)

    async def heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval_seconds if self.settings else 60.0
        now = self.clock()
        if self._last_heartbeat is not None and now - self._last_heartbeat < interval:
            return
        try:
            await self.site.heartbeat(tracker_report(self.agent))
            self._last_heartbeat = now
        except SiteError as e:
            log.warning("heartbeat_failed", error=str(e))

    def interval(self) -> float:
        s = self.settings
        if s is not None and s.crash_interval_seconds:
            return float(s.crash_interval_seconds)
        return self.cfg.interval_seconds

    def _provider(self) -> SnapshotProvider:
        s = self.settings
        freq = s.app_frequency_seconds if s is not None else None
        if self.app is None or not freq:
            return self.crash if self.app is None or freq == 0 else self.app
        now = self.clock()
        if self._last_app is None or now - self._last_app >= freq:
            self._last_app = now
            return self.app
        return self.crash

    async def round(self) -> bool:
        """One round: settings, heartbeat, and a cycle if the item is to replicate (or
        a failover asks for a last one and a shutdown: ``mobility/shutdown.py``).
        Returns whether a cycle ran."""
        await self.renew_if_due()
        s = await self.refresh()
        await self.heartbeat()
        if s is None and failback_pending(self.cfg.state_dir):
            log.warning("replication_held", reason="a failback was interrupted while "
                        "writing the disks", point=failback_pending(self.cfg.state_dir),
                        hint="the configuration server's failback asks again once it is "
                             "reachable; 'mobility failback --point ID' finishes it by hand")
            return False
        if s is None and (made_on := hostid.moved(self.agent.state_dir, self.agent.host_id)):
            # A copy of the machine (its disks recovered elsewhere) must not replicate as
            # the machine before the configuration server said which one it is.
            log.warning("replication_held", reason="this agent's state was made on another "
                        "machine", made_on=made_on, host_id=self.agent.host_id,
                        hint="it waits for the configuration server's settings")
            return False
        if s is not None and s.role == "recovered":
            # The recovered copy of the machine: never the original's failback or
            # shutdown (the server sends it neither); it replicates only when re-protected
            # through its agent.
            s = dataclasses.replace(s, failback_request=None, shutdown_request=None)
        if s is not None and asked_to_fail_back(s, self.cfg.state_dir):
            await answer_failback(self.agent, self.site, s)
            return False
        if s is not None and self._asked_to_shut_down():
            assert s.shutdown_request is not None
            self.agent.provider = self.crash
            self.last = await shut_down(self.agent, self.site, s.shutdown_request,
                                        self.cfg.shutdown_command) or self.last
            return True
        if s is not None and not s.replicate:
            log.info("replication_not_enabled", item_state=s.item_state)
            return False
        self.agent.provider = self._provider()
        if s is not None:
            self._group_due(s)
        if s is None:
            self.last = await self.agent.replicate_once()
            return True
        names = [d["name"] for d in self.cfg.disks]
        enabling = s.item_state in ENABLING
        async with ProgressReporter(self.site, names, active=False) as report:

            def on_kind(kind: str) -> None:
                # While enabling, every cycle is initial replication, whatever its kind:
                # an agent that kept its maps (protection enabled again) sends a delta, and
                # Enable protection waits for its 100 %. Once protected, whole disks copied
                # or compared are a resynchronization; deltas are not reported.
                if enabling or kind != "delta":
                    report.start(resync=not enabling)

            r = await self.agent.replicate_once(report, on_kind=on_kind,
                                                resync=s.resync_required,
                                                basis_point=s.basis_point)
        if r.kind == "resync":
            log.info("resynchronized", cycle=r.cycle, blocks=r.blocks_sent)
        self.last = r
        return True

    def _group_due(self, s: Settings) -> None:
        """A group point for this cycle when a new interval of the group began since the
        last one (the interval a daemon starts in is skipped: its members met already)."""
        g = s.group
        if not g:
            self._group_slot = None
            return
        slot, call = due_call(g["name"], tuple(g["members"]), g["interval_seconds"],
                              g["barrier_timeout_seconds"], self.wall())
        if self._group_slot is not None and slot != self._group_slot:
            self.agent.group_call = call
        self._group_slot = slot

    def _until_group_point(self) -> float | None:
        """Seconds (wall clock) until the group's next interval begins (None: no group)."""
        g = self.settings.group if self.settings is not None else None
        if not g:
            return None
        every = float(g["interval_seconds"])
        return every - self.wall() % every

    def _asked_to_shut_down(self) -> bool:
        s = self.settings
        return s is not None and s.shutdown_request is not None and \
            s.shutdown_request != answered(self.cfg.state_dir)

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds`` for the next round, pulling the settings every heartbeat
        interval meanwhile, and at once when the configuration server's long poll says
        something the agent acts on changed: a failover's shutdown request, a failback's,
        replication enabled, disabled or to be resynchronized end the wait then."""
        end = self.clock() + seconds
        group = self._until_group_point()
        if group is not None:  # every member wakes when the group's interval begins
            end = min(end, self.clock() + group + 0.05)
        while (left := end - self.clock()) > 0:
            every = self.settings.heartbeat_interval_seconds if self.settings else 60.0
            was = self.settings
            changed = await self._changes(min(left, max(1.0, every)))
            if changed or self.clock() < end:
                await self.refresh()
                if self._act_now(was):
                    return

    async def _changes(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a change the agent acts on at once (the
        configuration server's long poll, ``configserver/agentwatch.py``); whether one
        came. A plain wait without it: no settings yet, a server without the long poll,
        or the site listener out of reach (the next settings pull says more)."""
        since = self.settings.digest if self.settings is not None else None
        start = self.clock()
        if since is not None and self._long_poll:
            try:
                return await self.site.changes(since, timeout) != since
            except SiteRefused as e:
                if e.status == 404:
                    self._long_poll = False
                    log.info("settings_long_poll_unavailable",
                             hint="the configuration server predates it: the agent pulls "
                                  "its settings every heartbeat interval")
            except SiteError:
                pass
        await asyncio.sleep(max(0.0, timeout - (self.clock() - start)))
        return False

    def _act_now(self, was: Settings | None) -> bool:
        """Whether the settings just pulled call for a round now, not at the pause's end."""
        s = self.settings
        if s is None:
            return False
        if self._asked_to_shut_down() or asked_to_fail_back(s, self.cfg.state_dir):
            return True
        return was is not None and (s.replicate != was.replicate or
                                    (s.resync_required and not was.resync_required))

    async def run_forever(self) -> None:
        # Without jitter, as before: one agent per machine, each on its own schedule.
        backoff = Backoff(1.0, 60.0, jitter=False)
        while True:
            try:
                await self.round()
                backoff.reset()
                await self.pause(self.interval())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the daemon must keep protecting the machine
                delay = backoff.next()
                log.warning("cycle_failed", error=str(e) or type(e).__name__,
                            error_type=type(e).__name__, retry_in_seconds=delay)
                await asyncio.sleep(delay)
