"""The fingerprint map a cycle builds, held in a memory-mapped file, not the agent's
memory.

Each disk's new map (16 bytes a block) is written in place, block by block as the cycle
scans, into ``<disk>.<cycle>.part.fp`` in the state directory, a file of the map's size
mapped read-write: page cache the kernel writes back and can drop, however large the
disk. When the process server has acknowledged the cycle, ``finish`` flushes the map,
fsyncs the file and renames it to ``<disk>.<cycle>.fp``, the name ``state.json`` then
refers to. A cycle that fails leaves its part file, named like a map: the next committed
state (``tracker.commit_state``) removes every map file it does not name.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

from common.fs import fsync_dir
from mobility.tracker import write_map

PART = ".part.fp"
#: a new map: a memory map of its part file, or (a disk of no blocks) an empty bytearray
NewMap = bytearray | mmap.mmap


def part_path(state_dir: Path, disk: str, cycle: str) -> Path:
    return state_dir / f"{disk}.{cycle}{PART}"


def create(state_dir: Path, disk: str, cycle: str, nbytes: int) -> NewMap:
    """A map of ``nbytes`` zero bytes for ``disk``'s new map in ``cycle``."""
    if nbytes == 0:
        return bytearray()
    path = part_path(state_dir, disk, cycle)
    # A new file, not an old one truncated: a file of that name may still be mapped.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with open(path, "w+b") as f:
        os.chmod(path, 0o600)
        f.truncate(nbytes)
        return mmap.mmap(f.fileno(), nbytes)


def finish(state_dir: Path, disk: str, cycle: str, fps: NewMap) -> str:
    """Make ``fps`` the durable map file of ``disk`` in ``cycle`` (renamed, the rename
    fsynced before any state can name it); return its name. The memory map is closed."""
    name = f"{disk}.{cycle}.fp"
    if not isinstance(fps, mmap.mmap):
        write_map(state_dir, name, fps)
        return name
    path = part_path(state_dir, disk, cycle)
    fps.flush()
    fps.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(path, state_dir / name)
    fsync_dir(state_dir)
    return name
