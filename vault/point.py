"""Recovery-point manifests.

A point covers every disk of one machine at one consistency point. Its sealed
JSON names, per disk, the map object (full, or a delta on ``base``), the disk
size, block size and the end-to-end disk digest (see digest.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from common.labels import CONSISTENCY
from vault.crypto import Keyring, ObjectType, seal, unseal
from vault.errors import IntegrityError

MAX_POINT = 16 << 20
FORMATS = (1, 2, 3)  # manifests and configs this code reads
CHUNKED_FORMAT = 2  # from this format on, a point's maps are chunked (vault/mapchunks.py)
FRAMED_FORMAT = 3  # from this format on, packs are written in frames of blocks (pack.py)
WRITTEN_FORMAT = 3  # what this code writes


@dataclass(frozen=True)
class DiskEntry:
    disk: str
    size: int
    block_size: int
    map: str
    map_kind: str
    digest: str


@dataclass(frozen=True)
class Point:
    id: str
    machine: str
    created: str
    consistency: str
    cycle: str
    base: str | None
    chain: int
    disks: list[DiskEntry] = field(default_factory=list)
    policy: str = "default"
    format: int = 1

    def disk(self, name: str) -> DiskEntry:
        for d in self.disks:
            if d.disk == name:
                return d
        raise KeyError(name)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def encode_point(p: Point) -> bytes:
    return json.dumps(asdict(p), sort_keys=True).encode()


def decode_point(plain: bytes, what: str) -> Point:
    try:
        doc = json.loads(plain)
        disks = [DiskEntry(**d) for d in doc.pop("disks")]
        p = Point(disks=disks, **doc)
    except (ValueError, TypeError, KeyError) as e:
        raise IntegrityError(what, f"manifest is malformed: {e}") from None
    if p.format not in FORMATS or p.consistency not in CONSISTENCY:
        raise IntegrityError(what, "manifest has an unknown format or consistency label")
    return p


def seal_point(keyring: Keyring, p: Point) -> bytes:
    return seal(keyring.aead(ObjectType.POINT, p.id), ObjectType.POINT, p.id, encode_point(p))


def open_point(keyring: Keyring, name_id: str, sealed: bytes) -> Point:
    what = f"points/{name_id}"
    plain = unseal(keyring.aead(ObjectType.POINT, name_id), ObjectType.POINT, name_id, sealed,
                   max_size=MAX_POINT, what=what)
    p = decode_point(plain, what)
    if p.id != name_id:
        raise IntegrityError(what, "manifest names a different point id (swapped object)")
    return p
