"""An XFS with reflinks on a loop device, for the benchmarks whose agents clone their
images (``snapshot = "reflink"``) instead of reading them whole."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


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
