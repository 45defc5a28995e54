"""The process server's vault: opened at start, or in the background while its storage
does not answer (agents are acknowledged into the cache meanwhile, invariant 9).

``VaultAccess`` holds the store, the key material, the vault once it is open, and the
in-memory block index the uploader and resync share. ``vault`` raises
``VaultUnavailableError`` (a ``TransientStoreError``) until then; ``ready`` is set
once it is open.

``key_material`` turns the config's key settings (a key file and/or a passphrase from a
file or the environment) into the ``KeyMaterial`` that opens the vault.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import structlog

from common.backoff import Backoff
from procserver.config import ProcServerConfig
from vault.errors import TransientStoreError, WrongKeyError
from vault.index import Index
from vault.keyslots import KeyMaterial, read_keyfile
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
                 on_open: Callable[[], None] = lambda: None) -> None:
        self.store, self._km = store, km
        self.on_open = on_open  # called once the vault opened in the background
        self._vault: Vault | None = None
        self.ready = asyncio.Event()  # set once the vault is open
        self.index = Index()

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

    async def refresh_index(self) -> Index:
        """The block index, with what other writers added to the vault since."""
        self.index = await self.vault.refresh_index(self.index)
        return self.index

    async def open(self) -> None:
        """Open the vault and load its index (raises what ``Vault.open`` raises)."""
        vault = await Vault.open(self.store, self._km)
        try:
            self.index = await vault.load_index()
        except BaseException:
            await vault.close()
            raise
        self._vault = vault
        self.ready.set()

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
        await (self._vault.close() if self._vault is not None else self.store.close())
