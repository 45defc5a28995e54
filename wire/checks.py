"""Checks of the control frames an agent sends: nothing invalid gets past them."""

from __future__ import annotations

from typing import Any

from common.labels import CONSISTENCY
from common.names import HEX64, is_disk_name, is_id
from common.timefmt import UTC_TIME
from wire.protocol import ProtocolError

MAX_DISKS = 64
MAX_DISK_BYTES = 64 << 40


def validate_begin(doc: dict[str, Any]) -> None:
    cyc, disks = doc.get("cycle"), doc.get("disks")
    if not is_id(cyc):
        raise ProtocolError("bad_begin", "BEGIN needs a 'cycle' id of [a-z0-9-], max 64")
    if not isinstance(doc.get("full"), bool):
        raise ProtocolError("bad_begin", "BEGIN needs a boolean 'full'")
    base = doc.get("base")
    if not doc["full"] and not is_id(base):
        raise ProtocolError("bad_begin", "a delta cycle needs the 'base' cycle it builds on")
    if doc["full"] and base is not None and not is_id(base):
        raise ProtocolError("bad_begin", "'base' must be null or a cycle id")
    if doc.get("consistency") not in CONSISTENCY:
        raise ProtocolError("bad_begin", f"'consistency' must be one of {CONSISTENCY}")
    validate_disks(disks, "BEGIN")


def validate_end(end: dict[str, Any], cycle: str, disks: list[dict[str, Any]],
                 received: int) -> None:
    if end.get("blocks") != received:
        raise ProtocolError("bad_end", f"END counts {end.get('blocks')!r} blocks; "
                                       f"{received} arrived in this cycle")
    digests = end.get("digests")
    if end.get("cycle") != cycle or not isinstance(digests, dict) or \
            set(digests) != {d["name"] for d in disks}:
        raise ProtocolError("bad_end", "END must name the cycle and a digest for every disk")
    if not all(isinstance(v, str) and HEX64.fullmatch(v) for v in digests.values()):
        raise ProtocolError("bad_end", "each disk digest must be 64 lowercase hex characters")
    created = end.get("created")
    if not isinstance(created, str) or not UTC_TIME.fullmatch(created):
        raise ProtocolError("bad_end", "'created' must be a UTC time like "
                                       "2026-01-31T12:00:00.000000Z")


def validate_disks(disks: Any, what: str) -> None:
    """The ``disks`` list of a BEGIN or BASIS: names, sizes and block sizes."""
    code = "bad_" + what.lower()
    if not isinstance(disks, list) or not 1 <= len(disks) <= MAX_DISKS:
        raise ProtocolError(code, f"{what} needs 1-{MAX_DISKS} disks")
    names = set()
    for d in disks:
        if not isinstance(d, dict) or not is_disk_name(d.get("name")):
            raise ProtocolError(code, "each disk needs a 'name' of [A-Za-z0-9_.-]")
        size, bs = d.get("size"), d.get("block_size")
        if not isinstance(size, int) or not 0 < size <= MAX_DISK_BYTES:
            raise ProtocolError(code, f"disk {d['name']!r} has an invalid size")
        if not isinstance(bs, int) or bs & (bs - 1) or not (1 << 16) <= bs <= (1 << 20):
            raise ProtocolError(code,
                                f"disk {d['name']!r}: block_size must be a power of two, 64K-1M")
        names.add(d["name"])
    if len(names) != len(disks):
        raise ProtocolError(code, "disk names must be unique")
