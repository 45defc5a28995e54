"""Restore a whole recovery point into a folder: each disk to ``<folder>/<disk>.img``
(sparse raw) or ``<folder>/<disk>.vhd`` (fixed VHD), every block and every disk digest
verified (materialize.py, vhd.py). What ``siterecovery restore`` does, and what a
folder-of-images failover target needs; it needs only the vault and its key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from vault.indexopen import open_block_index
from vault.mapranges import RANGE_BLOCKS
from vault.materialize import Progress, materialize
from vault.point import Point
from vault.repo import Vault
from vault.vhd import materialize_vhd

# format -> (file extension, writer)
FORMATS = {"raw": ("img", materialize), "vhd": ("vhd", materialize_vhd)}


@dataclass(frozen=True)
class RestoredDisk:
    disk: str
    path: str
    size: int
    digest: str  # the end-to-end disk digest, verified against the point's


async def restore_point(
    vault: Vault, point: Point, folder: str | Path, *, fmt: str = "raw",
    disks: Collection[str] | None = None,
    progress: Callable[[str], Progress | None] | None = None,
    index_dir: str | os.PathLike[str] | None = None, index_memory: int | None = None,
    range_blocks: int = RANGE_BLOCKS,
) -> list[RestoredDisk]:
    """Write the disks of ``point`` (only those named in ``disks``, when given and not
    empty; names the point lacks are skipped) into ``folder``, created if need be, in
    the point's disk order. ``progress(disk)`` gives each disk's progress callback. A
    disk that fails verification raises (IntegrityError) and leaves no file under its
    name; the disks restored before it stay. With ``index_dir``, a vault whose index
    outgrows ``index_memory`` bytes is read through the on-disk index kept there
    (vault/indexopen.py), not loaded into memory. Each disk is restored
    ``range_blocks`` blocks at a time (vault/materialize.py)."""
    ext, write = FORMATS[fmt]
    index = await open_block_index(vault, index_dir=index_dir, memory=index_memory)
    out = Path(folder)
    done: list[RestoredDisk] = []
    with ThreadPoolExecutor(2) as ex, closing(index):
        out.mkdir(parents=True, exist_ok=True)
        for d in point.disks:
            if disks and d.disk not in disks:
                continue
            target = str(out / f"{d.disk}.{ext}")
            digest = await write(vault, point, d.disk, target, index=index, executor=ex,
                                 progress=progress(d.disk) if progress else None,
                                 range_blocks=range_blocks)
            done.append(RestoredDisk(d.disk, target, d.size, digest))
    return done
