"""The fingerprints of the point a failback writes, received from the process server
(``BASIS`` with ``point``, mobility/inplace.py) without holding a disk's map in memory.

Each disk's MAP frames are written to ``<disk>.failback.fp`` in the state directory as
they arrive (one frame held at a time), hashed on the way and checked against the
digest recorded with the point, then mapped read-only: page cache the kernel can drop,
however large the disk. When the failback ends the file becomes the agent's own map by a
rename; a failback that fails drops it (``drop_maps``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from common.digest import DiskDigest, block_count
from mobility.config import MobilityConfig
from mobility.link import FOREVER, Link
from mobility.tracker import OldMap
from wire.protocol import (
    FINGERPRINT,
    Frame,
    FrameType,
    ProtocolError,
    encode_json,
    raise_if_error,
)

log = structlog.get_logger("mobility.inplace")
FP = FINGERPRINT
MAP_SUFFIX = ".failback.fp"  # + in the state directory: the point's map of a disk, received


class FailbackError(Exception):
    """The point cannot be written onto this machine's disks (nothing was written)."""


@dataclass
class Basis:
    cycle: str
    point: str
    disks: list[dict[str, Any]]  # name, size, block_size, blocks, digest
    maps: dict[str, OldMap]  # the point's fingerprints of each disk, memory-mapped
    digests: dict[str, str]  # the digest of each disk's map, as received


def map_path(state_dir: Path, disk: str) -> Path:
    return state_dir / f"{disk}{MAP_SUFFIX}"


def drop_maps(state_dir: Path, maps: dict[str, OldMap]) -> None:
    """Close the received maps and remove their files (those not renamed)."""
    for m in maps.values():
        if isinstance(m, mmap.mmap):
            m.close()
    maps.clear()
    for p in state_dir.glob(f"*{MAP_SUFFIX}"):
        p.unlink(missing_ok=True)


async def receive(link: Link, cfg: MobilityConfig, point: str, state_dir: Path) -> Basis:
    """Ask for the point's fingerprints; each disk's MAP frames are written to its
    ``MAP_SUFFIX`` file as they come (one frame held at a time) and memory-mapped."""
    disks = [{"name": d["name"], "size": _size(d["path"]), "block_size": cfg.block_size}
             for d in cfg.disks]
    link.send(encode_json(FrameType.BASIS, {"disks": disks, "point": point}))
    wait = FOREVER if link.heartbeat else cfg.ack_timeout_seconds

    async def answer(want: FrameType) -> Frame:
        f = await link.recv(wait)
        if f.type == FrameType.ERROR and f.json().get("code") == "no_basis":
            raise FailbackError(f"the process server cannot offer point {point[:16]}: "
                                f"{f.json().get('message')}")
        raise_if_error(f)
        if f.type != want:
            raise ProtocolError("bad_basis", f"expected {want.name}, got {f.type.name}")
        return f

    doc = (await answer(FrameType.BASIS)).json()
    got = doc.get("disks")
    if (not isinstance(doc.get("cycle"), str) or not isinstance(got, list)
            or [g.get("name") if isinstance(g, dict) else None for g in got]
            != [d["name"] for d in cfg.disks]
            or not all(isinstance(g.get(k), int) and g[k] > 0 for g in got
                       for k in ("size", "block_size", "blocks"))
            or any(g["blocks"] != block_count(g["size"], g["block_size"]) for g in got)):
        raise ProtocolError("bad_basis", "the BASIS answer does not describe this "
                                         "machine's disks")
    maps: dict[str, OldMap] = {}
    digests: dict[str, str] = {}
    ok = False
    try:
        for idx, g in enumerate(got):
            n = g["blocks"]
            path = map_path(state_dir, g["name"])
            # A new file, not the old one truncated: an earlier one may still be mapped.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            dd = DiskDigest()
            with open(path, "w+b") as out:
                have = 0
                while have < n:
                    disk, first, part = (await answer(FrameType.MAP)).map()
                    more = len(part) // FP
                    if disk != idx or first != have or not 0 < more <= n - have:
                        raise ProtocolError("bad_map", f"MAP {disk}:{first}+{more} out of "
                                            f"order (expected disk {idx} from block {have})")
                    out.write(part)
                    dd.update(bytes(part))
                    have += more
                out.flush()
                os.fsync(out.fileno())
                maps[g["name"]] = mmap.mmap(out.fileno(), 0, access=mmap.ACCESS_READ)
            digests[g["name"]] = dd.hexdigest()
            digest = g.get("digest")
            if isinstance(digest, str) and digest and digests[g["name"]] != digest:
                raise ProtocolError("bad_basis", f"the fingerprints of disk {g['name']!r} "
                                                 "do not match the point's digest")
        ok = True
    finally:
        if not ok:
            drop_maps(state_dir, maps)
    log.info("failback_basis_received", point=doc.get("point"), cycle=doc["cycle"])
    return Basis(doc["cycle"], str(doc.get("point") or point), got, maps, digests)


def _size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


