"""``siterecovery restore --in-place DEVICE``: repair one disk from a recovery point,
writing only the blocks that differ (vault/inplace.py). Needs only the vault and its key."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict

from common.devicebusy import DeviceInUseError, check_not_in_use
from siterecovery.errors import CliError, UsageError
from siterecovery.output import show
from siterecovery.progress import Progress
from vault.indexopen import open_block_index
from vault.inplace import repair_in_place
from vault.point import Point
from vault.repo import Vault


class DiskInUseError(CliError):
    """The disk to repair is mounted or held (exit code 1): nothing was written."""


def refuse_in_use(path: str) -> None:
    """Before the vault is opened: a mounted or held disk is refused at once."""
    try:
        check_not_in_use(path)
    except DeviceInUseError as e:
        raise DiskInUseError(str(e)) from None


def pick_disk(point: Point, disks: list[str] | None) -> str:
    """The one disk of ``point`` that ``--disk`` names (or its only disk)."""
    have = [d.disk for d in point.disks]
    if disks and len(disks) > 1:
        raise UsageError("--in-place repairs one disk: give --disk once")
    if disks:
        if disks[0] not in have:
            raise UsageError(f"point {point.id[:16]} has no disk {disks[0]!r} "
                             f"(it has {', '.join(have)})")
        return disks[0]
    if len(have) != 1:
        raise UsageError(f"point {point.id[:16]} has several disks ({', '.join(have)}); "
                         "name the one to repair with --disk")
    return have[0]


async def restore_in_place(args: argparse.Namespace, v: Vault, point: Point) -> int:
    disk = pick_disk(point, args.disk)
    if args.format != "raw":
        raise UsageError("--in-place writes the disk's raw blocks; --format does not apply")
    bars = {phase: Progress(f"restore --in-place {disk} ({phase})", quiet=args.json)
            for phase in ("compare", "write")}
    index = await open_block_index(v, index_dir=args.index_dir,
                                   memory=args.index_memory_mib << 20)
    with ThreadPoolExecutor(2) as ex, closing(index):
        try:
            r = await repair_in_place(v, point, disk, args.in_place, index=index,
                                      executor=ex, progress=lambda phase, done, total:
                                      bars[phase](done, total))
        except DeviceInUseError as e:  # it became busy after the first check
            raise DiskInUseError(str(e)) from None
    out = {"point": point.id, "machine": point.machine, "created": point.created,
           "consistency": point.consistency, "in_place": True, **asdict(r)}
    return show(out, args,
                f"repaired {point.machine}/{disk} at {point.created} ({point.consistency}) "
                f"in place on {r.path}: {r.blocks_written} of {r.blocks_compared} blocks "
                f"differed and were written ({r.bytes_written} bytes); digest verified")
