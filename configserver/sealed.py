"""Push-install account secrets, sealed under a key that never enters the database.

The key is 32 random bytes in ``secrets.key`` (hex, one line, mode 0600) beside
the configuration server's other files (``cfg.secrets_key_path``); it is created
at the first start, while no account exists. A sealed secret is::

    magic "SRS1":4 | key id:8 | nonce:12 | AES-256-GCM(secret) + tag:16

with the associated data ``"siterecovery/account-secret/v1" 0 name 0 kind``: a
sealed row copied onto another account, or relabelled from password to SSH key,
does not open. The key id (a hash of the key) is stored so that a wrong key
file is reported as such instead of as "damaged". The file is re-read on every
use, so an operator who restores it from a backup needs no restart.

Nothing here logs a secret or puts one into an exception message.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select

from common.fs import create_exclusive
from configserver import db
from configserver.core import Core

log = structlog.get_logger("configserver.secrets")

MAGIC = b"SRS1"
KEY_BYTES = 32
NONCE_BYTES = 12
_AD_PREFIX = b"siterecovery/account-secret/v1\0"


class SecretError(Exception):
    """A secret cannot be sealed or opened; ``code`` and ``hint`` are for the operator."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"siterecovery secrets key id\0" + key).digest()[:8].hex()


def _ad(name: str, kind: str) -> bytes:
    return _AD_PREFIX + name.encode() + b"\0" + kind.encode()


def seal(key: bytes, name: str, kind: str, secret: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)  # one key, few seals: random nonces are safe
    return (MAGIC + bytes.fromhex(key_id(key)) + nonce
            + AESGCM(key).encrypt(nonce, secret, _ad(name, kind)))


def sealed_key_id(blob: bytes) -> str | None:
    """The id of the key ``blob`` was sealed under (None if it is not a sealed secret)."""
    return blob[4:12].hex() if blob[:4] == MAGIC and len(blob) >= 12 else None


def unseal(key: bytes, name: str, kind: str, blob: bytes, *, where: str = "") -> bytes:
    want = sealed_key_id(blob)
    if want is None or len(blob) < 12 + NONCE_BYTES + 16:
        raise SecretError("secret_damaged", f"the stored secret of account {name!r} is not "
                          "a sealed secret", "re-enter it: siterecovery account update "
                          f"{name} --password-file FILE | --ssh-key-file FILE")
    have = key_id(key)
    if want != have:
        raise SecretError(
            "secrets_key_mismatch",
            f"the secret of account {name!r} was sealed under key id {want}, but "
            f"{where or 'the secrets key file'} holds key id {have}",
            "put back the secrets.key file this server was using (from a backup), or "
            "re-enter the secret: siterecovery account update "
            f"{name} --password-file FILE | --ssh-key-file FILE")
    nonce, body = blob[12:12 + NONCE_BYTES], blob[12 + NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, _ad(name, kind))
    except InvalidTag:
        raise SecretError("secret_damaged", f"the stored secret of account {name!r} does "
                          "not authenticate under the secrets key (the database row was "
                          "altered or copied from another account)",
                          "re-enter it: siterecovery account update "
                          f"{name} --password-file FILE | --ssh-key-file FILE") from None


# -- the key file ----------------------------------------------------------

def read_key(path: Path) -> bytes:
    """The key in ``path``; ``SecretError`` if it is missing, exposed or malformed."""
    try:
        st = path.stat()
        text = path.read_text().strip()
    except FileNotFoundError:
        raise SecretError("secrets_key_missing", f"the secrets key file {path} is missing",
                          "restore it from your backup of the configuration server's data "
                          "directory; without it the stored account secrets cannot be "
                          "opened") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError("secrets_key_unreadable",
                          f"cannot read the secrets key file {path}: {e}",
                          "it must be a readable text file owned by the server's user"
                          ) from None
    if st.st_mode & 0o077:
        raise SecretError("secrets_key_exposed", f"the secrets key file {path} is readable "
                          f"by other users (mode {st.st_mode & 0o777:04o})",
                          f"chmod 600 {path}")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise SecretError("secrets_key_malformed", f"the secrets key file {path} does not "
                          f"hold a key ({KEY_BYTES * 2} hex digits)",
                          "restore the file from your backup")
    return key


def create_key(path: Path) -> bytes:
    """Write a new key to ``path`` (0600, never overwriting one), durably."""
    key = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    create_exclusive(path, key.hex() + "\n")
    log.info("secrets_key_created", path=str(path), key_id=key_id(key))
    return key


async def _account_count(core: Core) -> int:
    async with core.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(db.Account))
                    ).scalar_one())


async def ensure_key(core: Core, path: Path) -> None:
    """At start: create the key file ``path`` if there is none and nothing was sealed yet;
    if accounts exist and the file is missing, say so now (the server still starts)."""
    if path.exists():
        return
    count = await _account_count(core)
    if count == 0:
        create_key(path)
    else:
        log.warning("secrets_key_missing", path=str(path), accounts=count,
                    hint="restore the file from a backup; account secrets cannot be opened "
                         "until then")


async def key_for_sealing(core: Core, path: Path) -> bytes:
    """The key in ``path`` new secrets are sealed under. Created if missing while no account
    exists (it was never used); refused if accounts exist, since a new key would leave their
    secrets unopenable without anyone noticing."""
    try:
        return read_key(path)
    except SecretError as e:
        if e.code != "secrets_key_missing":
            raise
        if await _account_count(core) > 0:
            raise SecretError(e.code, e.message, e.hint + "; or, if it is lost for good, "
                              "remove every account (siterecovery account remove NAME) and "
                              "add them again") from None
    try:
        return create_key(path)
    except FileExistsError:  # another request created it just now
        return read_key(path)


async def open_secret(core: Core, path: Path, name: str) -> bytes:
    """The plaintext secret of account ``name`` (password or private key, UTF-8 bytes),
    opened with the key file ``path``, for the push installer. Never log the result.
    Raises ``SecretError`` with code ``account_not_found``, ``secrets_key_missing``/
    ``_unreadable``/``_exposed``/``_malformed``, ``secrets_key_mismatch`` or
    ``secret_damaged``."""
    async with core.sessionmaker() as s:
        acct = await s.get(db.Account, name)
    if acct is None:
        raise SecretError("account_not_found", f"no account named {name!r}",
                          "add it: siterecovery account add NAME --username USER "
                          "--password-file FILE | --ssh-key-file FILE")
    return unseal(read_key(path), acct.name, acct.kind, acct.secret, where=str(path))
