"""Registration with a vault: the registration key file, and the checks that admit it.

A registration key file (``siterecovery vault registration-key``) is JSON::

    {"format": "siterecovery-registration-key", "version": 1, "key_id": 16 hex,
     "vault_id": the vault's id, "vault_url": its store URL (no secrets: credentials
     come from files or the environment), "issued": ISO 8601 UTC, "expires": ISO 8601 UTC,
     "mac": 64 hex}

``mac`` is HMAC-SHA256 over the canonical JSON (sorted keys, no spaces) of every
other field, keyed by HKDF-SHA256(vault master key, info "siterecovery registration-key
v1"): only a holder of the vault's key can make one, and no field can be changed.

The configuration server admits a key in this order, each refusal with its own code
and nothing written: format (``registration_key_malformed``), expiry by its own clock
(``registration_key_expired``), the vault it
names opened with the server's vault key (``vault_key_unreadable``, ``vault_not_found``,
``vault_unreachable``; a key that opens no slot: ``registration_key_foreign``), the same
vault id (``registration_key_foreign``), the MAC (``registration_key_forged``), and
then this machine's clock against the storage service's (``clock_skew``; a local-folder
vault has no clock: accepted with a warning), and last a key issued in this clock's
future (``registration_key_not_yet_valid``: the issuing machine's clock is wrong).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.fs import atomic_write
from configserver import db
from configserver.rest import ApiError, iso
from vault.errors import (
    NotFoundError,
    PermanentStoreError,
    StoreError,
    VaultError,
    WrongKeyError,
)
from vault.keyslots import KeyMaterial, read_keyfile
from vault.open import open_backend
from vault.repo import Vault
from vault.retry import RetryStore

if TYPE_CHECKING:
    from configserver.server import ConfigServer

log = structlog.get_logger("configserver.registration")

FORMAT = "siterecovery-registration-key"
VERSION = 1
HKDF_INFO = b"siterecovery registration-key v1"
VALID_DAYS = 5
MAX_SKEW_SECONDS = 300.0
MAX_KEY_BYTES = 16 << 10
FIELDS = ("format", "version", "key_id", "vault_id", "vault_url", "issued", "expires", "mac")
_HEX = re.compile(r"[0-9a-f]+")
NO_CLOCK_WARNING = ("the vault is a local folder: there is no reference clock, so this "
                    "machine's clock was not checked; keep it synchronised (NTP)")


def mac_key(master: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(master)


def _mac(master: bytes, fields: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in fields.items() if k != "mac"}, sort_keys=True,
                      separators=(",", ":")).encode()
    return hmac.new(mac_key(master), body, hashlib.sha256).hexdigest()


def make_key(vault: Vault, vault_url: str, now: float, valid_days: float = VALID_DAYS
             ) -> dict[str, Any]:
    """A registration key for ``vault`` (opened with its key), valid from ``now``."""
    if not 0 < valid_days <= VALID_DAYS:
        raise ValueError(f"a registration key is valid for at most {VALID_DAYS} days")
    fields: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "key_id": secrets.token_hex(8),
        "vault_id": vault.config.vault_id, "vault_url": vault_url,
        "issued": iso(now), "expires": iso(now + valid_days * 86400)}
    fields["mac"] = _mac(vault.keyring.master_key, fields)
    return fields


def write_key(path: str | os.PathLike[str], key: dict[str, Any]) -> None:
    """Write the key file 0600 (temp file, fsync, rename: never half a key)."""
    atomic_write(path, json.dumps(key, indent=2) + "\n", 0o600)


@dataclass(frozen=True)
class RegistrationKey:
    fields: dict[str, Any]
    key_id: str
    vault_id: str
    vault_url: str
    issued: float
    expires: float


def _malformed(why: str) -> ApiError:
    return ApiError(422, "registration_key_malformed", f"not a registration key file: {why}",
                    "make one with 'siterecovery vault registration-key --out FILE' and pass "
                    "that file unchanged")


def _time(fields: dict[str, Any], name: str) -> float:
    v = fields[name]
    if not isinstance(v, str) or not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", v):
        raise _malformed(f"{name!r} must be a UTC time like 2026-01-31T12:00:00Z")
    try:
        return dt.datetime.fromisoformat(v).timestamp()
    except ValueError:
        raise _malformed(f"{name!r} is not a valid time") from None


def parse_key(text: str) -> RegistrationKey:
    """Check a key file's structure (not its MAC: that needs the vault's key)."""
    if len(text.encode()) > MAX_KEY_BYTES:
        raise _malformed(f"larger than {MAX_KEY_BYTES} bytes")
    try:
        fields = json.loads(text)
    except ValueError:
        raise _malformed("it is not JSON") from None
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        raise _malformed(f"'format' must be {FORMAT!r}")
    if fields.get("version") != VERSION:
        raise _malformed(f"version {fields.get('version')!r} is not {VERSION}")
    if sorted(fields) != sorted(FIELDS):
        raise _malformed(f"it must have exactly the fields {', '.join(FIELDS)}")
    for name, length in (("key_id", 16), ("vault_id", 32), ("mac", 64)):
        v = fields[name]
        if not isinstance(v, str) or len(v) != length or not _HEX.fullmatch(v):
            raise _malformed(f"{name!r} must be {length} lowercase hex digits")
    if not isinstance(fields["vault_url"], str) or not 0 < len(fields["vault_url"]) <= 2048:
        raise _malformed("'vault_url' must be a store URL")
    issued, expires = _time(fields, "issued"), _time(fields, "expires")
    if not 0 < expires - issued <= VALID_DAYS * 86400:
        raise _malformed(f"it must expire after it was issued, within {VALID_DAYS} days")
    return RegistrationKey(fields, fields["key_id"], fields["vault_id"], fields["vault_url"],
                           issued, expires)


@dataclass
class Outcome:
    row: db.Registration
    warnings: list[str]
    reference: str  # "storage" (the service's Date header) | "none" (a local folder)


def _vault_key_path(server: ConfigServer, given: str | None) -> str:
    path = given or server.cfg.vault_key_file
    if not path:
        raise ApiError(422, "vault_key_missing", "no vault key file to open the vault with",
                       "pass --vault-key FILE (a path on the configuration server) or set "
                       "vault_key_file in its configuration")
    if not os.path.isabs(path):
        raise ApiError(422, "vault_key_unreadable", f"vault key file {path!r} is not an "
                       "absolute path", "give the full path of the key file on the "
                       "configuration server")
    return path


async def _open(url: str, key_path: str) -> Vault:
    try:
        km = KeyMaterial(keyfile=read_keyfile(key_path))
    except WrongKeyError as e:
        raise ApiError(422, "vault_key_unreadable", str(e),
                       "give the vault's key file (0600) as a path on the configuration "
                       "server") from None
    except (OSError, ValueError) as e:
        raise ApiError(422, "vault_key_unreadable",
                       f"cannot read vault key file {key_path!r}: "
                       f"{getattr(e, 'strerror', None) or e}",
                       "check the path and that the configuration server may read it") \
            from None
    try:
        store = RetryStore(open_backend(url), attempts=3)
    except (PermanentStoreError, ValueError) as e:
        raise ApiError(422, "vault_unreachable", f"cannot open the store {url!r}: {e}",
                       "the registration key names the store; pass --vault URL to reach the "
                       "same store another way (credentials file)") from None
    try:
        return await Vault.open(store, km)
    except WrongKeyError:
        await store.close()
        raise ApiError(403, "registration_key_foreign",
                       f"the vault key {key_path} does not open the vault at {store.url} that "
                       "the registration key names: the key file belongs to another vault",
                       "use the key file of the vault the registration key came from, or a "
                       "registration key from this key's vault") from None
    except NotFoundError as e:
        await store.close()
        raise ApiError(422, "vault_not_found", str(e), "check the vault URL") from None
    except StoreError as e:
        await store.close()
        raise ApiError(503, "vault_unreachable", f"cannot read the vault at {store.url}: {e}",
                       "check the network and the storage credentials, then try again") \
            from None
    except OSError as e:
        await store.close()
        raise ApiError(422, "vault_unreadable", f"cannot read the vault at {store.url}: {e}",
                       "check the vault URL and the permissions") from None
    except VaultError as e:
        await store.close()
        msg = str(e)
        code = "vault_not_found" if msg.startswith("no vault at") else "vault_unreadable"
        raise ApiError(422, code, msg, "check the vault URL and run 'siterecovery check'") \
            from None


async def register(server: ConfigServer, key_text: str, vault_key_file: str | None,
                   vault_url: str | None) -> Outcome:
    """Verify a registration key and, if every check passes, record the registration."""
    key = parse_key(key_text)
    now = server.clock()
    if now > key.expires:
        raise ApiError(422, "registration_key_expired",
                       f"the registration key expired at {iso(key.expires)} (this server's "
                       f"clock says {iso(now)}); keys are valid for {VALID_DAYS} days",
                       "make a new one: siterecovery vault registration-key --out FILE")
    key_path = _vault_key_path(server, vault_key_file)
    url = vault_url or key.vault_url
    vault = await _open(url, key_path)
    try:
        if vault.config.vault_id != key.vault_id:
            raise ApiError(403, "registration_key_foreign",
                           f"the registration key is for vault {key.vault_id}, but the vault "
                           f"at {vault.store.url} is {vault.config.vault_id}",
                           "make a registration key from the vault to register with")
        if not hmac.compare_digest(_mac(vault.keyring.master_key, key.fields), key.fields["mac"]):
            raise ApiError(403, "registration_key_forged",
                           "the registration key's authentication code does not match: it was "
                           "changed after it was made, or not made with this vault's key",
                           "make a new one: siterecovery vault registration-key --out FILE")
        async with server.sessionmaker() as s:
            current = await s.get(db.Registration, 1)
        if current is not None and current.vault_id != key.vault_id:
            raise ApiError(409, "registered_elsewhere",
                           f"this configuration server is registered with vault "
                           f"{current.vault_id}; a key for vault {key.vault_id} cannot replace "
                           "it", "a configuration server serves one vault: register another "
                           "server, or use a key from the registered vault")
        try:
            t0 = server.clock()
            reference = await vault.store.server_time()
            local = (t0 + server.clock()) / 2
        except StoreError as e:
            raise ApiError(503, "vault_unreachable", f"cannot read the storage service's "
                           f"clock at {vault.store.url}: {e}", "try again") from None
    finally:
        await vault.close()
    warnings: list[str] = []
    skew: float | None = None
    if reference is None:
        warnings.append(NO_CLOCK_WARNING)
        log.warning("registration_clock_unchecked", vault=key.vault_id, reason=NO_CLOCK_WARNING)
    else:
        skew = local - reference
        if abs(skew) > MAX_SKEW_SECONDS:
            log.warning("registration_refused", vault=key.vault_id, reason="clock_skew",
                        skew_seconds=round(skew, 1))
            raise ApiError(409, "clock_skew",
                           f"this machine's clock is {abs(skew):.0f} seconds "
                           f"{'ahead of' if skew > 0 else 'behind'} the storage service's "
                           f"clock (its Date header); registration needs them within "
                           f"{MAX_SKEW_SECONDS / 60:.0f} minutes",
                           "synchronise this machine's clock (timedatectl set-ntp true, or "
                           "chrony), then register again")
    if key.issued > now + MAX_SKEW_SECONDS:  # judged once this server's clock is known good
        raise ApiError(422, "registration_key_not_yet_valid",
                       f"the registration key was issued at {iso(key.issued)}, in the future "
                       f"of this server's clock ({iso(now)})",
                       "the clock of the machine that made the key is wrong: synchronise it "
                       "(NTP) and make a new key")
    async with server.sessionmaker() as s:
        row = await s.get(db.Registration, 1)
        if row is None:
            row = db.Registration(id=1)
            s.add(row)
        row.vault_id, row.vault_url, row.key_id = key.vault_id, url, key.key_id
        row.registered_at, row.key_expires, row.skew_seconds = now, key.expires, skew
        row.vault_key_file = key_path
        await s.commit()
    log.info("registered", vault=key.vault_id, vault_url=vault.store.url, key_id=key.key_id,
             skew_seconds=None if skew is None else round(skew, 1))
    await server.notify()
    return Outcome(row, warnings, "none" if reference is None else "storage")


async def current(server: ConfigServer) -> db.Registration | None:
    async with server.sessionmaker() as s:
        return await s.get(db.Registration, 1)
