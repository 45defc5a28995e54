"""Which change tracker each disk gets (``tracker`` in mobility.toml)."""

from __future__ import annotations

from mobility.changes import FullScan, Tracker
from mobility.config import MobilityConfig
from mobility.reflinktrack import ReflinkTracker


def tracker_kind(cfg: MobilityConfig) -> str:
    """``cfg.tracker``, with ``auto`` resolved: the reflink diff when the images are
    cloned each cycle (``snapshot = "reflink"``), else the full scan."""
    if cfg.tracker != "auto":
        return cfg.tracker
    return "reflink" if cfg.snapshot == "reflink" else "scan"


def trackers_for(cfg: MobilityConfig) -> dict[str, Tracker]:
    """One tracker per disk name."""
    kind = tracker_kind(cfg)
    return {d["name"]: ReflinkTracker(d["path"]) if kind == "reflink" else FullScan()
            for d in cfg.disks}
