"""The Mobility agent's typed configuration (one flat TOML file)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from common.pacing import Schedule

SNAPSHOTS = ("none", "quiesced", "fsfreeze", "lvm", "reflink", "script", "libvirt")
TRACKERS = ("auto", "scan", "reflink", "blocktrace", "libvirt")
# Snapshots under which no write lands between the snapshot and the tracker's cut.
BLOCKTRACE_SNAPSHOTS = ("none", "quiesced", "fsfreeze", "script")
_LVM_SIZE = re.compile(r"(\d{1,3}%ORIGIN|\d+(\.\d+)?[KMGT]?)", re.IGNORECASE)


@dataclass(frozen=True)
class MobilityConfig:
    machine: str
    server_host: str
    tls_ca: str
    tls_cert: str
    tls_key: str
    state_dir: str
    disks: list[dict[str, Any]]
    server_port: int = 9443
    # The configuration server's site listener (https://HOST:9441). Set: `mobility run`
    # pulls its settings (process server, policy intervals), heartbeats and reports
    # progress there. Empty: the agent replicates on this file alone.
    site_url: str = ""
    interval_seconds: float = 30.0
    block_size: int = 64 * 1024
    snapshot: str = "none"
    freeze_mounts: list[str] = field(default_factory=list)
    pre_script: str = ""
    post_script: str = ""
    script_timeout_seconds: float = 60.0
    # snapshot = "lvm": copy-on-write space of each disk's LVM snapshot, N%ORIGIN or
    # a size such as 2G.
    lvm_snapshot_size: str = "10%ORIGIN"
    # snapshot = "libvirt": the agent runs on the KVM/QEMU host and protects the disks
    # of this running domain (each disk's name its target, e.g. vda) through pull-mode
    # backups and checkpoints (QEMU dirty bitmaps; qcow2 images).
    libvirt_uri: str = "qemu:///system"
    libvirt_domain: str = ""
    # Where each cycle's NBD socket folder is made (QEMU creates the socket: a place
    # both it and the agent see, outside a private /tmp; the unit's RuntimeDirectory).
    libvirt_socket_dir: str = "/run/siterecovery-mobility"
    # How a cycle finds the changed blocks: "scan" reads every block; "reflink" compares
    # the extent maps of this cycle's and the last one's clone (snapshot = "reflink"
    # only); "blocktrace" records the block devices' completed writes from tracefs;
    # "auto" takes reflink where it can, else scan.
    tracker: str = "auto"
    # tracker = "blocktrace": the trace ring buffer per CPU, in KiB. An overrun (too
    # small for the write rate) costs a full scan, never a missed write.
    blocktrace_buffer_kb: int = 4096
    # A disk whose changes come from a tracker (reflink, blocktrace) is read whole at
    # most this often anyway — a verification scan: what changed outside the tracker's
    # ranges is sent all the same, counted and reported (tracker_missed_writes). A full
    # or rescanned cycle counts as one. 0: never.
    tracker_verify_hours: float = 24.0
    # snapshot = "fsfreeze" (or "script" around it): what a cycle reads is copied into
    # a spool in memory of at most this many MiB while the filesystems are frozen, which
    # are thawed before it is sent. A cycle that reads more (a full copy, a rescan, a
    # verification scan) is sent frozen, as without a spool, and logged. 0: never spool.
    freeze_spool_mb: int = 128
    # The agent's metrics in Prometheus's text format, rewritten after every cycle (for
    # node_exporter's textfile collector); "" = none.
    metrics_file: str = ""
    connect_timeout_seconds: float = 15.0
    ack_timeout_seconds: float = 300.0
    # How long a cycle whose connection broke keeps trying to resume (0: never).
    resume_timeout_seconds: float = 120.0
    # Bandwidth the agent may use towards the process server, in Mbit/s: during
    # work_hours on work_days, and outside them (as ASR's throttling). 0: unlimited.
    send_limit_work_mbps: float = 0.0
    send_limit_off_mbps: float = 0.0
    work_days: str = "mon-fri"
    work_hours: str = "08:00-18:00"
    # What a failover's shutdown request runs, after the last cycle was acknowledged
    # (argv, no shell). The agent goes on running until the machine goes down.
    shutdown_command: list[str] = field(default_factory=lambda: ["systemctl", "poweroff"])
    # The machine's SMBIOS UUID (mobility/hostid.py): what tells the original machine
    # from its recovered copy, whose disks carry this agent. "" = none reported.
    host_id_file: str = "/sys/class/dmi/id/product_uuid"

    def send_schedule(self) -> Schedule:
        return Schedule.from_mbps(self.send_limit_work_mbps, self.send_limit_off_mbps,
                                  self.work_days, self.work_hours)

    def validate(self) -> None:
        if not self.disks:
            raise ValueError("'disks' must list at least one disk")
        for d in self.disks:
            if set(d) != {"name", "path"} or not all(isinstance(v, str) for v in d.values()):
                raise ValueError("each entry of 'disks' needs exactly a 'name' and a 'path'")
        bs = self.block_size
        if bs & (bs - 1) or not (1 << 16) <= bs <= (1 << 20):
            raise ValueError("block_size must be a power of two from 65536 to 1048576")
        if self.snapshot not in SNAPSHOTS:
            raise ValueError(f"snapshot must be one of {', '.join(SNAPSHOTS)}")
        if not _LVM_SIZE.fullmatch(self.lvm_snapshot_size):
            raise ValueError(f"lvm_snapshot_size {self.lvm_snapshot_size!r}: use N%ORIGIN "
                             "(e.g. 10%ORIGIN) or a size such as 2G or 512M")
        if self.tracker not in TRACKERS:
            raise ValueError(f"tracker must be one of {', '.join(TRACKERS)}")
        if self.tracker == "reflink" and self.snapshot != "reflink":
            raise ValueError("tracker = 'reflink' needs snapshot = 'reflink' (it compares "
                             "the clones that snapshot makes); use tracker = 'auto'")
        if (self.snapshot == "libvirt") != (self.tracker == "libvirt") and \
                self.tracker != "auto":
            raise ValueError("snapshot = 'libvirt' and tracker = 'libvirt' go together (the "
                             "tracker reads the backup the snapshot begins); use tracker = "
                             "'auto'")
        if self.snapshot == "libvirt" and not self.libvirt_domain:
            raise ValueError("snapshot = 'libvirt' needs libvirt_domain")
        if self.tracker == "blocktrace" and self.snapshot not in BLOCKTRACE_SNAPSHOTS:
            raise ValueError("tracker = 'blocktrace' needs snapshot = 'none', 'quiesced', "
                             "'fsfreeze' or 'script' (writes between an lvm or reflink "
                             "snapshot and the tracker's cut would be missed)")
        if not 0 <= self.tracker_verify_hours <= 24 * 366:
            raise ValueError("tracker_verify_hours must be from 0 (never) to 8784")
        if not 4 <= self.blocktrace_buffer_kb <= (1 << 20):
            raise ValueError("blocktrace_buffer_kb must be from 4 to 1048576")
        if not 0 <= self.freeze_spool_mb <= (1 << 20):
            raise ValueError("freeze_spool_mb must be from 0 (never spool) to 1048576")
        if self.snapshot == "fsfreeze" and not self.freeze_mounts:
            raise ValueError("snapshot = 'fsfreeze' needs freeze_mounts")
        if self.snapshot == "script" and not (self.pre_script and self.post_script):
            raise ValueError("snapshot = 'script' needs pre_script and post_script")
        if self.interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        if self.resume_timeout_seconds < 0:
            raise ValueError("resume_timeout_seconds must not be negative")
        if not self.shutdown_command or not all(
                isinstance(a, str) and a for a in self.shutdown_command):
            raise ValueError("shutdown_command must be a non-empty list of arguments, e.g. "
                             "[\"systemctl\", \"poweroff\"]")
        self.send_schedule()  # the limits, days and hours parse
