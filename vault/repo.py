"""``Vault``: open or create a vault and read/write its objects in the right order.

Write ordering (a reader never sees a point that is not whole): packs, then the
index object describing them, then maps, then the point manifest last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar, overload

from common.timefmt import now_iso
from vault import names
from vault.crypto import MASTER_KEY_BYTES, Keyring, ObjectType, seal
from vault.errors import (
    FormatError,
    IntegrityError,
    MissingObjectError,
    NotFoundError,
    VaultError,
    WrongKeyError,
)
from vault.index import BlockIndex, Index, open_index, seal_index
from vault.keyopen import scan_key_slots
from vault.keyslots import KeyMaterial, wrap
from vault.manifestcache import ManifestCache, PointScan, scan_points
from vault.mapchunks import CHUNK_ENTRIES, open_chunked, seal_chunked
from vault.maps import (
    DELTA,
    ENTRY,
    FULL,
    HEAD,
    ZERO_ID,
    BlockMap,
    MapBuilder,
    encode_map,
    open_map,
    seal_map,
    seal_map_plaintext,
)
from vault.mapspool import MapSpool
from vault.pack import FRAME_BYTES, ZSTD_LEVEL, PackEntry, open_block
from vault.point import (
    CHUNKED_FORMAT,
    FORMATS,
    FRAMED_FORMAT,
    WRITTEN_FORMAT,
    Point,
    open_point,
    seal_point,
)
from vault.store.protocol import BlobStore

IndexT = TypeVar("IndexT", bound=BlockIndex)

DEFAULT_BLOCK_SIZE = 64 * 1024
MAX_CHAIN = 16


@dataclass(frozen=True)
class VaultConfig:
    vault_id: str
    created: str
    block_size: int
    format: int = 1

    @classmethod
    def from_json(cls, plain: bytes) -> VaultConfig:
        """The config from its authenticated plaintext. Raises ``IntegrityError`` if it is
        malformed, ``FormatError`` if its format is newer than this program knows."""
        try:
            config = cls(**json.loads(plain))
        except (ValueError, TypeError) as e:
            raise IntegrityError(names.CONFIG, f"config is malformed: {e}") from None
        if config.format not in FORMATS:
            raise FormatError(f"vault format {config.format} is newer than this program knows")
        return config


async def _put_config(store: BlobStore, keyring: Keyring, config: VaultConfig) -> None:
    body = json.dumps(config.__dict__, sort_keys=True).encode()
    await store.put(names.CONFIG, seal(keyring.aead(ObjectType.CONFIG, names.CONFIG),
                                       ObjectType.CONFIG, names.CONFIG, body))


class Vault:
    #: the id of the key slot that opened this vault (``Vault.open``); None if created
    slot: str | None = None
    #: entries a chunk of the maps this vault object writes (format 2 on)
    map_chunk_entries: int = CHUNK_ENTRIES

    #: the most plaintext of blocks a frame of the packs this vault object writes holds
    #: (format 3; ``vault/pack.py``)
    frame_target: int = FRAME_BYTES

    #: the zstd level of the packs this vault object writes (not part of the format: a
    #: reader decompresses whatever level it was)
    zstd_level: int = ZSTD_LEVEL

    @property
    def frame_bytes(self) -> int:
        """The plaintext of a frame in the packs this vault is written with (0: one
        block a sealed unit, formats 1 and 2)."""
        return self.frame_target if self.config.format >= FRAMED_FORMAT else 0

    def __init__(self, store: BlobStore, keyring: Keyring, config: VaultConfig) -> None:
        self.store = store
        self.keyring = keyring
        self.config = config
        # The manifests ``scan_points`` opened (vault/manifestcache.py): a long-lived
        # vault object (a process server's), or vault objects given one cache (the
        # configuration server's recovery jobs), read only what changed since.
        self.manifests = ManifestCache()

    # -- lifecycle ---------------------------------------------------------
    @classmethod
    async def create(
        cls, store: BlobStore, km: KeyMaterial | Sequence[KeyMaterial],
        block_size: int = DEFAULT_BLOCK_SIZE, *, fmt: int = WRITTEN_FORMAT,
    ) -> Vault:
        """Create a vault with one key slot per ``KeyMaterial`` (each a key file or a
        passphrase). Slots are written before the config: the config makes it a vault."""
        kms = [km] if isinstance(km, KeyMaterial) else list(km)
        if not kms:
            raise WrongKeyError("a vault needs at least one key file or passphrase")
        if block_size & (block_size - 1) or not (64 * 1024 <= block_size <= 1024 * 1024):
            raise FormatError("block size must be a power of two from 64 KiB to 1 MiB")
        try:
            await store.stat(names.CONFIG)
        except NotFoundError:
            pass
        else:
            raise VaultError(f"{store.url} already holds a vault; refusing to overwrite it")
        await store.setup()
        master = secrets.token_bytes(MASTER_KEY_BYTES)
        keyring = Keyring(master)
        config = VaultConfig(vault_id=secrets.token_hex(16), created=now_iso(),
                             block_size=block_size, format=fmt)
        slots = [wrap(master, k) for k in kms]  # every KDF runs before anything is written
        for slot, doc in slots:
            await store.put(names.KEYS + slot, doc)
        await _put_config(store, keyring, config)
        return cls(store, keyring, config)

    @classmethod
    async def open(cls, store: BlobStore, km: KeyMaterial) -> Vault:
        """Open the vault in ``store`` with the first key slot ``km`` opens
        (``vault/keyopen.py``).

        Raises ``VaultError`` if ``store`` holds no vault, ``WrongKeyError`` if no slot
        opens, ``IntegrityError`` if the config fails to authenticate under every slot
        ``km`` unlocks or is malformed, ``FormatError`` for a newer format."""
        try:
            sealed_config = await store.get(names.CONFIG)
        except NotFoundError:
            raise VaultError(
                f"no vault at {store.url}; create one with 'siterecovery vault init'"
            ) from None
        scan = await scan_key_slots(store, km, sealed_config)
        if scan.opened is None or scan.keyring is None or scan.config is None:
            if scan.config_error is not None:
                raise scan.config_error
            what = " and ".join(w for w, given in (("key file", km.keyfile is not None),
                                                   ("passphrase", km.passphrase is not None))
                                if given) or "key"
            damaged = [slot for slot, _why in scan.damaged]
            extra = f" ({len(damaged)} damaged: {', '.join(damaged)})" if damaged else ""
            raise WrongKeyError(
                f"the {what} given opens none of the {len(scan.slots)} key slot(s) of the "
                f"vault at {store.url}{extra}; check --key-file / the passphrase"
            )
        v = cls(store, scan.keyring, VaultConfig.from_json(scan.config))
        v.slot = scan.opened[len(names.KEYS):]
        return v

    async def close(self) -> None:
        await self.store.close()

    async def set_format(self, fmt: int) -> None:
        """Write the config again with format ``fmt`` (``vault migrate``, under the
        exclusive lock): maps and points are written so from then on, and a program
        that does not know the format refuses the vault."""
        if fmt not in FORMATS:
            raise FormatError(f"vault format {fmt} is not one this program writes")
        config = dataclasses.replace(self.config, format=fmt)
        await _put_config(self.store, self.keyring, config)
        self.config = config

    # -- writes, in order ----------------------------------------------------
    async def put_pack(self, pack_id: str, data: bytes | bytearray) -> None:
        await self.store.put(names.pack_name(pack_id), data)

    async def put_index(self, packs: dict[str, list[PackEntry]],
                        index: BlockIndex | None = None) -> str:
        """Write an index object; record it in ``index`` (with its entries) if given."""
        name_id = names.random_id()
        await self.store.put(names.INDEX + name_id, seal_index(self.keyring, name_id, packs))
        if index is not None:
            index.add_object(names.INDEX + name_id, packs)
        return name_id

    def map_writer(self, kind: int, size: int, block_size: int, *,
                   spool_dir: str | os.PathLike[str] | None = None) -> MapBuilder | MapSpool:
        """Where a map is written entry by entry, in increasing block order, before
        ``put_map``: sealed chunk by chunk into a file in ``spool_dir`` and put from it a
        part at a time (format 2 on: ``vault/mapspool.py``), or built in memory to be
        sealed whole (format 1). The caller closes what it gets (after ``put_map``)."""
        if self.config.format >= CHUNKED_FORMAT:
            return MapSpool(self.keyring, kind, size, block_size,
                            chunk_entries=self.map_chunk_entries, spool_dir=spool_dir)
        return MapBuilder(kind, size, block_size)

    async def put_map(self, m: BlockMap | MapBuilder | MapSpool, fmt: int | None = None
                      ) -> str:
        """Write a map as the vault's format (or ``fmt``) lays it out: sealed whole
        (format 1) or in chunks (format 2 on, ``vault/mapchunks.py``); the point naming it
        must have that format. A ``MapSpool`` (``map_writer``) is put from its file."""
        if isinstance(m, MapSpool):
            return await m.put(self.store)
        name_id = names.random_id()
        fmt = self.config.format if fmt is None else fmt
        if fmt < CHUNKED_FORMAT:
            sealed = (seal_map_plaintext(self.keyring, name_id, m.plaintext())
                      if isinstance(m, MapBuilder) else seal_map(self.keyring, name_id, m))
            await self.store.put(names.MAPS + name_id, sealed)
            return name_id
        if isinstance(m, MapBuilder):
            kind, size, bs, body = m.kind, m.size, m.block_size, m.body()
        else:
            kind, size, bs = m.kind, m.size, m.block_size
            body = memoryview(encode_map(m))[HEAD.size:]
        await self.store.put(names.MAPS + name_id,
                             seal_chunked(self.keyring, name_id, kind, size, bs, body,
                                          self.map_chunk_entries))
        return name_id

    async def put_point(self, p: Point) -> None:
        await self.store.put(names.POINTS + p.id, seal_point(self.keyring, p))

    # -- reads -----------------------------------------------------------------
    @overload
    async def load_index(self) -> Index: ...

    @overload
    async def load_index(self, index: IndexT) -> IndexT: ...

    async def load_index(self, index: BlockIndex | None = None) -> BlockIndex:
        """Load every index object into a new in-memory ``Index``, or into ``index`` (only
        the objects it has not loaded yet), and return it."""
        index = index if index is not None else Index()
        async for info in self.store.list(names.INDEX):
            if info.name in index.objects:
                continue
            sealed = await self.store.get(info.name)
            if isinstance(index, Index):
                self._load_index_object(index, info.name, sealed)
            else:
                # Filling a table takes twice the time of a dict: off the event loop.
                await asyncio.to_thread(self._load_index_object, index, info.name, sealed)
        if not isinstance(index, Index):
            await asyncio.to_thread(index.settle)
        return index

    def _load_index_object(self, index: BlockIndex, name: str, sealed: bytes) -> None:
        index.add_object(name, open_index(self.keyring, name[len(names.INDEX):], sealed))

    async def refresh_index(self, index: IndexT) -> IndexT:
        """Bring ``index`` up to date: new objects are added; if any object it was built
        from is gone (a prune rewrote the index), it is replaced by a fresh one of the same
        kind (``BlockIndex.fresh``), loaded whole."""
        current = {b.name async for b in self.store.list(names.INDEX)}
        if not index.objects <= current:
            index = index.fresh()
        return await self.load_index(index)

    async def has_point(self, point_id: str) -> bool:
        try:
            await self.store.stat(names.POINTS + point_id)
        except NotFoundError:
            return False
        return True

    async def read_point(self, point_id: str) -> Point:
        try:
            raw = await self.store.get(names.POINTS + point_id)
        except NotFoundError:
            raise MissingObjectError(names.POINTS + point_id, "the manifest is missing") from None
        return open_point(self.keyring, point_id, raw)

    async def list_points(self, machine: str | None = None) -> list[Point]:
        """Every whole recovery point, oldest first. The first manifest that fails to
        authenticate raises ``IntegrityError``: for callers that act on the whole set
        (prune, point selection), where skipping one would change what they decide."""
        scan = await self.scan_points(machine)
        if scan.damaged:
            raise scan.damaged[0][1]
        return scan.points

    async def scan_points(self, machine: str | None = None) -> PointScan:
        """Every recovery point whose manifest authenticates (of ``machine``, if given),
        oldest first, and every manifest that does not, in name order, with its error
        (its machine cannot be known: it is listed whatever ``machine`` is). A manifest
        deleted since the listing is left out; store errors raise.

        A manifest this vault object opened before is not read again while the listing
        shows it at the same version (``BlobInfo.version``: any write of it changes
        that); one that failed to authenticate always is (a check opens a vault object
        of its own, which reads every manifest). ``self.manifests`` may be shared by
        vault objects of the vault: then so are the manifests opened and the reads in
        flight (vault/manifestcache.py)."""
        return await scan_points(self.store, self.keyring, self.manifests,
                                 f"{self.store.url}#{self.config.vault_id}", machine)

    async def read_map(self, map_id: str, fmt: int = WRITTEN_FORMAT) -> BlockMap:
        """Map ``map_id`` as a dict, read as a point of format ``fmt`` names it."""
        if fmt >= CHUNKED_FORMAT:
            m = await open_chunked(self.store, self.keyring, map_id)
            blocks: dict[int, bytes] = {}
            for i in range(len(m.chunks)):
                blocks.update(ENTRY.iter_unpack(await m.chunk(i)))
            return BlockMap(m.kind, m.size, m.block_size, blocks)
        try:
            raw = await self.store.get(names.MAPS + map_id)
        except NotFoundError:
            raise MissingObjectError(names.MAPS + map_id, "the map is missing") from None
        return open_map(self.keyring, map_id, raw)

    async def resolve_map(self, point: Point, disk: str) -> BlockMap:
        """The full map of ``disk`` at ``point``: its base full map plus deltas in order."""
        chain: list[BlockMap] = []
        p: Point | None = point
        while p is not None:
            entry = p.disk(disk)
            m = await self.read_map(entry.map, p.format)
            chain.append(m)
            if entry.map_kind == "full":
                break
            if p.base is None or len(chain) > MAX_CHAIN:
                raise IntegrityError(f"points/{point.id}", "delta chain is broken")
            p = await self.read_point(p.base)
        full = chain.pop()
        if full.kind != FULL or any(d.kind != DELTA for d in chain):
            raise IntegrityError(f"points/{point.id}", "map kinds do not match the manifest")
        blocks = dict(full.blocks)
        for delta in reversed(chain):
            for n, bid in delta.blocks.items():
                if bid == ZERO_ID:
                    blocks.pop(n, None)
                else:
                    blocks[n] = bid
        top = chain[0] if chain else full
        return BlockMap(0, top.size, top.block_size, blocks)

    async def read_block(self, block_id: bytes, index: BlockIndex) -> bytes:
        loc = index.get(block_id)
        if loc is None:
            raise IntegrityError(block_id.hex(), "block is referenced but in no index")
        sealed = await self.store.get(names.pack_name(loc.pack_id), loc.offset, loc.length)
        return open_block(self.keyring, loc.pack_id, block_id, sealed)
