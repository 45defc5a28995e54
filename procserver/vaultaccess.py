"""The process server's vault: opened at start, or in the background while its storage
does not answer (agents are acknowledged into the cache meanwhile, invariant 9).

``VaultAccess`` holds the store, the key material, the vault once it is open, and the
block index the uploader and resync share: in memory, or with ``index_dir`` given, on
local disk (vault/indexdb.py) once the vault's index outgrows ``index_memory`` bytes
(vault/indexopen.py); the on-disk one stays between starts and is brought up to date
(or rebuilt after a prune) by ``refresh_index``. ``vault`` raises
``VaultUnavailableError`` (a ``TransientStoreError``) until then; ``ready`` is set
once it is open.

Its pack log (``pack_log``, procserver/packlog.py) records every pack the uploader puts
before it puts it (``pack_recorder``); the packs a kill or a failed upload left outside
the index are settled (procserver/orphans.py) at start, before ``ready`` lets the
uploader go on (``settle_orphans``), and for each cycle once its point is written
(``settle_cycle``).

``key_material`` turns the config's key settings (a key file and/or a passphrase from a
file or the environment) into the ``KeyMaterial`` that opens the vault.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import structlog

from common.backoff import Backoff
from procserver.config import ProcServerConfig
from procserver.orphans import settle
from procserver.packlog import PackLog
from vault.errors import TransientStoreError, WrongKeyError
from vault.index import BlockIndex, Index
from vault.indexdb import DiskIndex
from vault.indexopen import open_block_index, open_disk_index, outgrown
from vault.keyslots import KeyMaterial, read_keyfile
from vault.locks import locked
from vault.pack import FRAME_BYTES, ZSTD_LEVEL
from vault.repo import Vault
from vault.store.protocol import BlobStore

log = structlog.get_logger("procserver")


class VaultUnavailableError(TransientStoreError):
    """The process server has not been able to open its vault yet."""


# A passphrase is a line of text; a file bigger than this is a mistaken path.
MAX_PASSPHRASE_FILE = 64 << 10


def key_material(cfg: ProcServerConfig) -> KeyMaterial:
    """The key file and/or passphrase the config names (blocking: reads files).

    Every way a source fails to give a key (a key file or passphrase file missing,
    unreadable or not UTF-8 text, an environment variable unset, an empty passphrase,
    nothing given) is a ``WrongKeyError`` naming the config key and the file or variable:
    the key does not open the vault, and the operator must be told where to look. As on
    the command line, one trailing newline of a passphrase file is not part of it."""
    keyfile = read_keyfile(cfg.vault_key_file) if cfg.vault_key_file else None
    secret: str | None = None
    if cfg.vault_passphrase_file:
        path, where = cfg.vault_passphrase_file, "vault_passphrase_file"
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_PASSPHRASE_FILE + 1)
            if len(raw) > MAX_PASSPHRASE_FILE:
                raise WrongKeyError(f"{where}: {path!r} is not a passphrase file (too large)")
            secret = raw.decode().removesuffix("\n").removesuffix("\r")
        except FileNotFoundError:
            raise WrongKeyError(f"{where}: passphrase file {path!r} does not exist") from None
        except UnicodeDecodeError:
            raise WrongKeyError(f"{where}: passphrase file {path!r} is not UTF-8 text"
                                ) from None
        except OSError as e:
            raise WrongKeyError(f"{where}: cannot read passphrase file {path!r}: "
                                f"{e.strerror or e}") from None
        if not secret:
            raise WrongKeyError(f"{where}: the passphrase in {path!r} is empty")
    elif cfg.vault_passphrase_env:
        secret = os.environ.get(cfg.vault_passphrase_env)
        if not secret:
            raise WrongKeyError(f"vault_passphrase_env: environment variable "
                                f"{cfg.vault_passphrase_env} is not set or empty")
    if keyfile is None and secret is None:
        raise WrongKeyError("no vault key: set vault_key_file, vault_passphrase_file or "
                            "vault_passphrase_env")
    return KeyMaterial(keyfile=keyfile, passphrase=secret)


class VaultAccess:
    def __init__(self, store: BlobStore, km: KeyMaterial,
                 on_open: Callable[[], None] = lambda: None,
                 pack_log: PackLog | None = None,
                 index_dir: str | os.PathLike[str] | None = None,
                 index_memory: int | None = None,
                 frame_bytes: int = FRAME_BYTES, zstd_level: int = ZSTD_LEVEL) -> None:
        self.store, self._km = store, km
        self.frame_bytes = frame_bytes  # a frame's blocks in the packs written (format 3)
        self.zstd_level = zstd_level  # the zstd level of the packs written
        self.index_dir, self.index_memory = index_dir, index_memory
        self.on_open = on_open  # called once the vault opened in the background
        self.pack_log = pack_log
        # Awaited by ``open`` before ``ready`` is set (the daemon settles orphans there).
        self.before_ready: Callable[[], Awaitable[None]] | None = None
        self._vault: Vault | None = None
        self.ready = asyncio.Event()  # set once the vault is open
        self.index: BlockIndex = Index()
        self._refresh_lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._vault is not None

    @property
    def vault(self) -> Vault:
        """The vault; ``VaultUnavailableError`` while its storage has not answered yet."""
        if self._vault is None:
            raise VaultUnavailableError(f"the vault at {self.store.url} has not answered "
                                        "since this process server started")
        return self._vault

    async def refresh_index(self) -> BlockIndex:
        """The block index, with what other writers added to the vault since.

        One refresh at a time: an on-disk index that a prune made stale is closed and
        replaced (``BlockIndex.fresh``), which must not happen under another refresh
        still filling it. An in-memory index that outgrew ``index_memory`` (chosen when
        the vault was smaller, or empty) moves to ``index_dir``: a cycle writing with it
        meanwhile keeps it until its next refresh, and is told as after a prune."""
        async with self._refresh_lock:
            index = await self.vault.refresh_index(self.index)
            if self.index_dir is not None and outgrown(index, self.index_memory):
                self.index = await open_disk_index(self.vault, self.index_dir,
                                                   self.index_memory, len(index))
                log.info("block_index_on_disk", path=str(self.index.path),
                         memory_budget_bytes=self.index_memory, blocks=len(index),
                         reason="the vault's index outgrew the memory budget")
            else:
                self.index = index
            return self.index

    async def open(self) -> None:
        """Open the vault and load its index (raises what ``Vault.open`` raises)."""
        vault = await Vault.open(self.store, self._km)
        vault.frame_target, vault.zstd_level = self.frame_bytes, self.zstd_level
        try:
            self.index = await open_block_index(vault, index_dir=self.index_dir,
                                                memory=self.index_memory)
            if isinstance(self.index, DiskIndex):
                if self.index.discarded:
                    log.warning("block_index_discarded", path=str(self.index.path),
                                reason=self.index.discarded,
                                hint="it was rebuilt from the vault's index objects")
                log.info("block_index_on_disk", path=str(self.index.path),
                         memory_budget_bytes=self.index_memory)
        except BaseException:
            await vault.close()
            raise
        self._vault = vault
        if self.before_ready is not None:
            await self.before_ready()
        self.ready.set()

    def pack_recorder(self, cycle_seq: int) -> Callable[[str], Awaitable[None]] | None:
        """What the uploader's writer awaits before it puts a pack of cycle ``cycle_seq``:
        the pack is recorded (fsynced) in the pack log. None without a pack log. A log
        that cannot be written is logged (``pack_log_unwritable``), never an upload
        failure."""
        pack_log = self.pack_log
        if pack_log is None:
            return None

        async def record(pack_id: str) -> None:
            try:
                await asyncio.to_thread(pack_log.record, pack_id, cycle_seq)
            except OSError as e:
                # A full or failing data disk must not stop the uploads that free the
                # cache: the pack goes up unrecorded, and if it is ever orphaned, 'prune'
                # (not this process server) removes it.
                log.warning("pack_log_unwritable", path=str(pack_log.path), error=str(e),
                            pack=pack_id, hint="free space on the process server's data disk")

        return record

    async def settle_orphans(self, resumable: set[int]) -> None:
        """Settle every pack in the pack log (``orphans.settle``), with ``resumable`` the
        cycles that will go on, under the vault's shared lock. Nothing here stops the
        process server: a vault that is locked (a prune) or fails leaves them for the next
        start (``orphan_packs_left``)."""
        if self.pack_log is None or not await asyncio.to_thread(self.pack_log.read):
            return
        try:
            async with locked(self.vault, "shared", "settle orphan packs"):
                index = await self.refresh_index()
                done = await settle(self.vault, index, self.pack_log, resumable)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("orphan_packs_left", vault=self.store.url, error=str(e),
                        error_type=type(e).__name__,
                        hint="they are settled at the next start; 'siterecovery prune' "
                             "removes them too")
            return
        log.info("orphan_packs_settled", adopted=len(done.adopted), removed=len(done.removed),
                 damaged=len(done.damaged))

    async def settle_cycle(self, cycle_seq: int) -> None:
        """Remove the packs cycle ``cycle_seq`` put that no index lists (left by attempts
        that failed), now that its point is written; the caller holds the vault's shared
        lock. A store error leaves them for the next start (``orphan_packs_left``)."""
        if self.pack_log is None:
            return
        try:
            index = await self.refresh_index()
            done = await settle(self.vault, index, self.pack_log, set(), only={cycle_seq})
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("orphan_packs_left", vault=self.store.url, cycle_seq=cycle_seq,
                        error=str(e), error_type=type(e).__name__,
                        hint="they are settled at the next start")
            return
        if done.removed:
            log.info("orphan_packs_settled", cycle_seq=cycle_seq, adopted=0,
                     removed=len(done.removed), damaged=0)

    async def open_later(self) -> None:
        """Retry ``open`` with back-off until it succeeds, then call ``on_open``."""
        backoff = Backoff(jitter=False)
        delay = backoff.next()
        while True:
            await asyncio.sleep(delay)
            try:
                await self.open()
            except TransientStoreError as e:
                delay = backoff.next()
                log.warning("vault_unavailable", vault=self.store.url, error=str(e),
                            retry_in_seconds=delay)
                continue
            except Exception as e:  # a wrong key, a vault that is not there: say so loudly
                delay = backoff.next()
                log.error("vault_open_failed", vault=self.store.url, error=str(e),
                          error_type=type(e).__name__, retry_in_seconds=delay,
                          hint="check vault_url and vault_key_file; the cache keeps filling")
                continue
            log.info("vault_opened", vault=self.store.url, blocks_indexed=len(self.index))
            self.on_open()
            return

    async def close(self) -> None:
        self.index.close()
        await (self._vault.close() if self._vault is not None else self.store.close())
