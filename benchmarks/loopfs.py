"""Loop devices for the benchmarks: an XFS with reflinks (agents that clone their images,
``snapshot = "reflink"``), an image attached with tracefs mounted (the block-layer
tracker), and a SIGTERM that takes them down as Ctrl-C does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from mobility.blocktrace import tracefs_root


@contextlib.contextmanager
def xfs_folder(work: Path, size: int) -> Iterator[Path]:
    """A mounted XFS with reflinks of ``size`` bytes on a loop device over a sparse file in
    ``work`` (root); unmounted and removed afterwards."""
    if os.geteuid() != 0:
        raise SystemExit("--tracker reflink needs root (a loop device and mount)")
    backing, mnt = work / "xfs.img", work / "xfs"
    with open(backing, "wb") as f:
        f.truncate(size)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev], check=True)
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)
        backing.unlink(missing_ok=True)


@contextlib.contextmanager
def loop_disk(work: Path, image: Path) -> Iterator[Path]:
    """``image`` attached to a loop device (root), tracefs mounted if it is not."""
    if os.geteuid() != 0:
        raise SystemExit("--tracker blocktrace needs root (a loop device and tracefs)")
    mounted = None
    if tracefs_root() is None:
        mounted = work / "tracefs"
        mounted.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(mounted)], check=True)
    try:
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                             capture_output=True, text=True).stdout.strip()
        try:
            yield Path(dev)
        finally:
            subprocess.run(["losetup", "--detach", dev], check=False)
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=False)


def cancelled_by_sigterm() -> None:
    """A SIGTERM cancels the run like Ctrl-C: what it set up (a loop device, tracefs, a
    domain, an XFS) is taken down on the way out instead of left behind."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
