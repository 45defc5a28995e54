"""Which change tracker each disk gets (``tracker`` in mobility.toml)."""

from __future__ import annotations

import hashlib
import os

from mobility.blocktrace import BlockTraceTracker
from mobility.changes import FullScan, Tracker
from mobility.config import MobilityConfig
from mobility.libvirtbackup import LibvirtBackup
from mobility.reflinktrack import ReflinkTracker
from mobility.snapshot import SnapshotProvider


def tracker_kind(cfg: MobilityConfig) -> str:
    """``cfg.tracker``, with ``auto`` resolved: the reflink diff when the images are
    cloned each cycle (``snapshot = "reflink"``), the dirty bitmaps of the libvirt
    backup (``snapshot = "libvirt"``), else the full scan (the block-layer
    tracker only when asked for: it needs tracefs and root)."""
    if cfg.tracker != "auto":
        return cfg.tracker
    if cfg.snapshot == "libvirt":
        return "libvirt"
    return "reflink" if cfg.snapshot == "reflink" else "scan"


def instance_name(state_dir: str, disk: str) -> str:
    """The tracefs instance of an agent's disk: ``siterecovery-<disk>-<8 hex>``."""
    key = f"{os.path.abspath(state_dir)}\0{disk}".encode()
    return f"siterecovery-{disk}-{hashlib.sha256(key).hexdigest()[:8]}"


def trackers_for(cfg: MobilityConfig, provider: SnapshotProvider | None = None
                 ) -> dict[str, Tracker]:
    """One tracker per disk name (``libvirt``: from the ``LibvirtBackup`` provider)."""
    kind = tracker_kind(cfg)
    out: dict[str, Tracker] = {}
    for d in cfg.disks:
        if kind == "libvirt":
            if not isinstance(provider, LibvirtBackup):
                raise ValueError("tracker = 'libvirt' needs snapshot = 'libvirt'")
            out[d["name"]] = provider.tracker(d["name"])
        elif kind == "reflink":
            out[d["name"]] = ReflinkTracker(d["path"])
        elif kind == "blocktrace":
            out[d["name"]] = BlockTraceTracker(d["name"], d["path"],
                                               instance_name(cfg.state_dir, d["name"]),
                                               cfg.blocktrace_buffer_kb)
        else:
            out[d["name"]] = FullScan()
    return out
