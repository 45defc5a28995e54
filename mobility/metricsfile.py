"""The agent's metrics, written as a Prometheus text file after every cycle.

A protected machine often reaches nothing but its process server, and an agent that
listened on a port would be one more thing to open in its firewall: instead the agent
writes ``metrics_file`` (mobility.toml; empty: none) in the text exposition format,
atomically, for node_exporter's textfile collector (``--collector.textfile.directory``)
or any scraper that reads files. Counters count from the agent's start, as a
listener's would; gauges describe the last cycle.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.fs import atomic_write

PREFIX = "siterecovery_agent"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(frozen=True)
class CycleFacts:
    """What one acknowledged cycle did, as the metrics need it."""

    kind: str  # full, delta, resync
    consistency: str
    ended: float  # UNIX seconds
    duration_seconds: float
    hold_seconds: float  # the snapshot (freeze) held: scan and send under it
    blocks_sent: int
    bytes_sent: int
    bytes_read: int
    tracking: dict[str, str]  # disk -> what found its changes
    fallbacks: dict[str, str]  # disk -> why its tracker scanned
    verified: tuple[str, ...]  # the disks this cycle gave a verification scan
    missed: dict[str, int]  # disk -> missed blocks its last verification scan found
    verified_at: dict[str, float]  # disk -> its last whole read (0: unknown)
    spooled_bytes: int = 0  # copied to the freeze spool, sent after the thaw
    spool_overflow: bool = False  # more to read than the spool holds: sent frozen


@dataclass
class AgentMetrics:
    machine: str
    path: Path
    cycles: Counter[str] = field(default_factory=Counter)  # kind -> acknowledged cycles
    failures: Counter[str] = field(default_factory=Counter)  # error type -> failed cycles
    bytes_sent: int = 0
    bytes_read: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)  # disk -> tracker fallbacks
    verifications: Counter[str] = field(default_factory=Counter)  # disk -> verification scans
    spool_overflows: int = 0
    last: CycleFacts | None = None

    def cycle_done(self, facts: CycleFacts) -> None:
        self.cycles[facts.kind] += 1
        self.bytes_sent += facts.bytes_sent
        self.bytes_read += facts.bytes_read
        for disk in facts.fallbacks:
            self.fallbacks[disk] += 1
        for disk in facts.verified:
            self.verifications[disk] += 1
        self.spool_overflows += facts.spool_overflow
        self.last = facts
        self.write()

    def cycle_failed(self, error_type: str) -> None:
        self.failures[error_type] += 1
        self.write()

    def render(self) -> str:
        m = self.machine
        lines: list[str] = []

        def metric(name: str, kind: str, text: str,
                   samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {text}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{_label(v)}"' for k, v in {"machine": m, **labels}.items())
                lines.append(f"{PREFIX}_{name}{{{lab}}} {value:.17g}")

        metric("cycles_total", "counter", "acknowledged cycles, by kind",
               [({"kind": k}, float(self.cycles[k])) for k in ("full", "delta", "resync")])
        metric("cycle_failures_total", "counter", "cycles that failed, by error type",
               [({"error_type": k}, float(v)) for k, v in sorted(self.failures.items())])
        metric("sent_bytes_total", "counter", "block data sent to the process server",
               [({}, float(self.bytes_sent))])
        metric("read_bytes_total", "counter", "bytes read from the disks to find changes",
               [({}, float(self.bytes_read))])
        metric("tracker_fallbacks_total", "counter",
               "cycles in which a disk's tracker could not vouch for it (whole disk read)",
               [({"disk": d}, float(v)) for d, v in sorted(self.fallbacks.items())])
        metric("tracker_verifications_total", "counter",
               "verification scans of a tracked disk",
               [({"disk": d}, float(v)) for d, v in sorted(self.verifications.items())])
        metric("freeze_spool_overflows_total", "counter",
               "cycles that read more than freeze_spool_mb and were sent while frozen",
               [({}, float(self.spool_overflows))])
        last = self.last
        if last is not None:
            metric("last_cycle_timestamp_seconds", "gauge",
                   "when the last acknowledged cycle ended", [({}, last.ended)])
            metric("last_cycle_duration_seconds", "gauge",
                   "the last acknowledged cycle, from its start to the acknowledgement",
                   [({}, last.duration_seconds)])
            metric("last_cycle_hold_seconds", "gauge",
                   "how long the last cycle held its snapshot (with fsfreeze: the freeze)",
                   [({}, last.hold_seconds)])
            metric("last_cycle_spooled_bytes", "gauge",
                   "bytes the last cycle copied to its spool while frozen (0: none)",
                   [({}, float(last.spooled_bytes))])
            metric("last_cycle_read_bytes", "gauge",
                   "bytes the last cycle read from the disks", [({}, float(last.bytes_read))])
            metric("last_cycle_sent_bytes", "gauge",
                   "block data the last cycle sent", [({}, float(last.bytes_sent))])
            metric("last_cycle_blocks", "gauge", "blocks the last cycle sent",
                   [({}, float(last.blocks_sent))])
            metric("disk_tracker_info", "gauge",
                   "what found the changes of each disk in the last cycle",
                   [({"disk": d, "tracker": t}, 1.0) for d, t in sorted(last.tracking.items())])
            metric("disk_verified_timestamp_seconds", "gauge",
                   "when each disk was last read whole (0: not known)",
                   [({"disk": d}, t) for d, t in sorted(last.verified_at.items())])
            metric("disk_tracker_missed_blocks", "gauge",
                   "changed blocks the last verification scan found the tracker had missed",
                   [({"disk": d}, float(n)) for d, n in sorted(last.missed.items())])
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        atomic_write(self.path, self.render(), mode=0o644)  # read by another user's scraper
