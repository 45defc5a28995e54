"""The index: block id -> (pack, offset, length).

An index object's plaintext is ``u32 npacks`` then, per pack,
``pack_id[32] | u32 count | count x (id[32] | u64 offset | u32 length)``.
Index objects are written after the packs they describe and before any map
that references their blocks; the index can be rebuilt from pack trailers.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol, Self

from vault.crypto import Keyring, ObjectType, seal, unseal
from vault.errors import IntegrityError, UnindexedBlocksError
from vault.pack import ENTRY, PackEntry

MAX_INDEX = 256 << 20


@dataclass(frozen=True, slots=True)
class Location:
    pack_id: str
    offset: int
    length: int


class BlockIndex(Protocol):
    """Where every block of a vault is: what the index objects loaded into it say.

    Two implementations: ``Index`` (a dict in memory, about 220 bytes a block) and
    ``DiskIndex`` (vault/indexdb.py: a table on local disk behind a Bloom filter, for
    vaults whose index does not fit the memory budget). ``Vault.load_index`` and
    ``Vault.refresh_index`` fill either from the vault's index objects."""

    @property
    def objects(self) -> AbstractSet[str]:
        """The index objects (store names) loaded into it."""
        ...

    @property
    def packs(self) -> AbstractSet[str]:
        """Every pack those objects list. A block stored twice is located in one of them
        only, but deleting the other would still break the index object that lists it."""
        ...

    @property
    def entries(self) -> Mapping[bytes, Location]:
        """Every block id and its location (iterating it reads the whole index)."""
        ...

    def get(self, block_id: bytes) -> Location | None:
        """Where ``block_id`` is, or None if no loaded index object lists it."""
        ...

    def lookup(self, block_ids: Iterable[bytes]) -> dict[bytes, Location]:
        """The locations of those of ``block_ids`` that are indexed, looked up in one
        batch (in id order): what a restore or a pack's worth of blocks asks."""
        ...

    def add_pack(self, pack_id: str, pack_entries: list[PackEntry]) -> None:
        """Record a pack's entries (not tied to an index object)."""
        ...

    def add_object(self, name: str, packs: dict[str, list[PackEntry]]) -> None:
        """Record index object ``name`` and every entry of ``packs`` it lists, at once:
        after a crash either all of it is there or none of it."""
        ...

    def settle(self) -> None:
        """Finish what ``add_object`` left for later (``DiskIndex``: staged entries moved
        into its table), which the next read would otherwise do; loaders call it off the
        event loop after a batch of objects."""
        ...

    def fresh(self) -> Self:
        """An empty index of the same kind (and place) that replaces this one, which
        must not be used any more: what ``Vault.refresh_index`` rebuilds when an index
        object it was built from is gone."""
        ...

    def close(self) -> None:
        """Let go of what it holds (files); a closed index must not be used."""
        ...

    def __contains__(self, block_id: object) -> bool: ...

    def __len__(self) -> int: ...


@dataclass
class Index:
    """The in-memory view of every index object of a vault (a ``BlockIndex``)."""

    entries: dict[bytes, Location] = field(default_factory=dict)
    objects: set[str] = field(default_factory=set)  # the index objects loaded into it
    # Every pack those objects list: a block stored twice is located in one of them only,
    # but deleting the other would still break the index object that lists it.
    packs: set[str] = field(default_factory=set)

    def add_pack(self, pack_id: str, pack_entries: list[PackEntry]) -> None:
        self.packs.add(pack_id)
        for e in pack_entries:
            self.entries[e.block_id] = Location(pack_id, e.offset, e.length)

    def add_object(self, name: str, packs: dict[str, list[PackEntry]]) -> None:
        for pack_id, pack_entries in packs.items():
            self.add_pack(pack_id, pack_entries)
        self.objects.add(name)

    def get(self, block_id: bytes) -> Location | None:
        return self.entries.get(block_id)

    def lookup(self, block_ids: Iterable[bytes]) -> dict[bytes, Location]:
        entries = self.entries
        return {b: loc for b in block_ids if (loc := entries.get(b)) is not None}

    def settle(self) -> None:
        pass

    def fresh(self) -> Index:
        return Index()

    def close(self) -> None:
        pass

    def __contains__(self, block_id: object) -> bool:
        return block_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)


def locate_blocks(index: BlockIndex, point: str, disk: str, blocks: dict[int, bytes]
                  ) -> dict[str, list[tuple[int, bytes, Location]]]:
    """Where the ``blocks`` (block number -> id) of ``disk`` of ``point`` (a store name,
    ``points/<id>``) are, grouped by pack in first-seen order: what a restore reads. The
    ids are looked up in one batch (``BlockIndex.lookup``).

    Raises ``UnindexedBlocksError`` (naming how many and the first) if any block is in no
    index object: the index, not the point, is what is damaged then."""
    out: dict[str, list[tuple[int, bytes, Location]]] = defaultdict(list)
    found = index.lookup(set(blocks.values()))
    missing: list[int] = []
    for n, bid in blocks.items():
        loc = found.get(bid)
        if loc is None:
            missing.append(n)
        else:
            out[loc.pack_id].append((n, bid, loc))
    if missing:
        raise UnindexedBlocksError(point, disk, len(missing), min(missing))
    return out


def encode_index(packs: dict[str, list[PackEntry]]) -> bytes:
    out = [struct.pack("<I", len(packs))]
    for pack_id, entries in packs.items():
        out.append(bytes.fromhex(pack_id) + struct.pack("<I", len(entries)))
        out.extend(ENTRY.pack(e.block_id, e.offset, e.length) for e in entries)
    return b"".join(out)


def decode_index(plain: bytes, what: str) -> dict[str, list[PackEntry]]:
    try:
        (npacks,) = struct.unpack_from("<I", plain, 0)
        pos = 4
        packs: dict[str, list[PackEntry]] = {}
        for _ in range(npacks):
            pack_id = plain[pos : pos + 32].hex()
            (count,) = struct.unpack_from("<I", plain, pos + 32)
            pos += 36
            packs[pack_id] = [
                PackEntry(*ENTRY.unpack_from(plain, pos + i * ENTRY.size)) for i in range(count)
            ]
            pos += count * ENTRY.size
    except struct.error:
        raise IntegrityError(what, "index is truncated") from None
    if pos != len(plain):
        raise IntegrityError(what, "index has trailing bytes")
    return packs


def seal_index(keyring: Keyring, name_id: str, packs: dict[str, list[PackEntry]]) -> bytes:
    return seal(keyring.aead(ObjectType.INDEX, name_id), ObjectType.INDEX, name_id,
                encode_index(packs))


def open_index(keyring: Keyring, name_id: str, sealed: bytes) -> dict[str, list[PackEntry]]:
    what = f"index/{name_id}"
    plain = unseal(keyring.aead(ObjectType.INDEX, name_id), ObjectType.INDEX, name_id, sealed,
                   max_size=MAX_INDEX, what=what)
    return decode_index(plain, what)
