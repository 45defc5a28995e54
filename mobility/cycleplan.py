"""What a cycle compares the disks against: nothing (a full copy), the agent's own
fingerprint maps (a delta), or the fingerprints of the vault's newest point of the
machine, asked of the process server (a resync, ``BASIS``).

A basis arrives as MAP frames, range by range; each is written to ``<disk>.basis.fp``
in the state directory as it comes (one frame held at a time) and the cycle reads the
file through a read-only memory map: page cache the kernel can drop, not the agent's
own memory, however large the disk. The file goes with the next committed state
(``tracker.commit_state`` keeps only the maps it names), or at the next basis. A basis
cut short (an ERROR after some MAP frames: the server found the point damaged) is
dropped whole.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from common.digest import block_count
from mobility.config import MobilityConfig
from mobility.link import FOREVER, Link
from mobility.tracker import AgentState, OldMap, load_map
from wire.protocol import (
    FINGERPRINT,
    Frame,
    FrameType,
    ProtocolError,
    encode_json,
    raise_if_error,
)

log = structlog.get_logger("mobility")
BASIS_SUFFIX = ".basis.fp"


@dataclass(frozen=True)
class Plan:
    """A cycle's kind (``full``, ``delta``, ``resync``), the cycle it builds on and the
    old fingerprints of each disk (None: every block is sent)."""

    kind: str
    base: str | None
    olds: dict[str, OldMap | None]

    @property
    def full(self) -> bool:
        return self.kind == "full"


def full_plan(sizes: dict[str, int]) -> Plan:
    return Plan("full", None, dict.fromkeys(sizes))


def plan_cycle(cfg: MobilityConfig, state_dir: Path, state: AgentState | None,
               sizes: dict[str, int], resync: bool) -> Plan:
    """A delta on the agent's own maps if it has them all, for this layout."""
    full = full_plan(sizes)
    if state is None or resync:
        return full
    olds: dict[str, OldMap | None] = {}
    for d in cfg.disks:
        ds = state.disks.get(d["name"])
        if ds is None or ds.size != sizes[d["name"]] or ds.block_size != cfg.block_size:
            return full
        olds[d["name"]] = load_map(state_dir, ds)
        if olds[d["name"]] is None:
            return full
    return Plan("delta", state.last_cycle, olds)


async def fetch_basis(link: Link, cfg: MobilityConfig, sizes: dict[str, int],
                      point: str | None = None) -> Plan | None:
    """Ask for the fingerprints of the vault's newest point of this machine, or of
    ``point`` (a recovered machine's first cycle: the point it started from); None if
    the process server has none to offer (the cycle is then a full one)."""
    if "resync" not in link.features:
        return None
    bs = cfg.block_size
    disks = [{"name": d["name"], "size": sizes[d["name"]], "block_size": bs}
             for d in cfg.disks]
    named = point is not None and "restore" in link.features
    link.send(encode_json(FrameType.BASIS, {"disks": disks, **({"point": point}
                                                               if named else {})}))
    # Reading a point back takes a while; heartbeats tell a slow server from a dead one.
    wait = FOREVER if link.heartbeat else cfg.ack_timeout_seconds

    async def answer(want: FrameType) -> Frame | None:
        f = await link.recv(wait)
        if f.type == FrameType.ERROR and f.json().get("code") == "no_basis":
            log.info("resync_basis_unavailable", reason=f.json().get("message"))
            return None
        raise_if_error(f)
        if f.type != want:
            raise ProtocolError("bad_basis", f"expected {want.name}, got {f.type.name}")
        return f

    head = await answer(FrameType.BASIS)
    if head is None:
        return None
    doc = head.json()
    counts = [block_count(sizes[d["name"]], bs) for d in cfg.disks]
    described = doc.get("disks")
    if not isinstance(doc.get("cycle"), str) or not isinstance(described, list) or [
            {"name": x.get("name"), "blocks": x.get("blocks")} if isinstance(x, dict) else x
            for x in described] != [{"name": d["name"], "blocks": n}
                                    for d, n in zip(cfg.disks, counts, strict=True)]:
        raise ProtocolError("bad_basis", "the BASIS answer does not describe this "
                                         "machine's disks")
    state_dir = Path(cfg.state_dir)
    olds: dict[str, OldMap | None] = {}
    done = False
    try:
        for idx, (d, n) in enumerate(zip(cfg.disks, counts, strict=True)):
            path = state_dir / f"{d['name']}{BASIS_SUFFIX}"
            # A new file, not the old one truncated: an earlier basis may still be mapped.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with open(path, "w+b") as out:
                got = 0
                while got < n:
                    f = await answer(FrameType.MAP)
                    if f is None:
                        return None
                    disk, first, part = f.map()
                    more = len(part) // FINGERPRINT
                    if disk != idx or first != got or not 0 < more <= n - got:
                        raise ProtocolError("bad_map", f"MAP {disk}:{first}+{more} out of "
                                            f"order (expected disk {idx} from block {got})")
                    out.write(part)
                    got += more
                out.flush()
                olds[d["name"]] = (mmap.mmap(out.fileno(), 0, access=mmap.ACCESS_READ)
                                   if n else b"")
        done = True
    finally:
        if not done:
            drop_basis(state_dir, olds)
    log.info("resync_basis_received", point=doc.get("point"), cycle=doc["cycle"])
    return Plan("resync", doc["cycle"], olds)


def drop_basis(state_dir: Path, olds: dict[str, OldMap | None]) -> None:
    """Close the memory maps of a basis that will not be used, and remove its files."""
    for m in olds.values():
        if isinstance(m, mmap.mmap):
            m.close()
    olds.clear()
    for p in state_dir.glob(f"*{BASIS_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
