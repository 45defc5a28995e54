"""Registration with a vault: the checks that admit a registration key, and the record.

The key file's format (make, parse, authenticate) is ``vault/regkey.py``.
The configuration server admits a key in this order, each refusal with its own code
and nothing written: format (``registration_key_malformed``), expiry by its own clock
(``registration_key_expired``), the vault it
names opened with the server's vault key (``vault_key_unreadable``, ``vault_not_found``,
``vault_unreachable``; a key that opens no slot: ``registration_key_foreign``), the same
vault id (``registration_key_foreign``), the MAC (``registration_key_forged``), and
then this machine's clock against the storage service's (``clock_skew``; a local-folder
vault has no clock: accepted with a warning), and last a key issued in this clock's
future (``registration_key_not_yet_valid``: the issuing machine's clock is wrong).
Refusals are domain errors (``configserver/errors.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import structlog

from configserver import db
from configserver.core import Core
from configserver.errors import (
    ClockSkew,
    Conflict,
    InvalidRequest,
    Refused,
    RegistrationExpired,
    Unavailable,
)
from configserver.schema import iso
from vault.errors import (
    NotFoundError,
    PermanentStoreError,
    StoreError,
    VaultError,
    WrongKeyError,
)
from vault.keyslots import KeyMaterial, read_keyfile
from vault.regkey import VALID_DAYS, MalformedKey, RegistrationKey, parse_key
from vault.repo import Vault
from vault.store.open import open_backend
from vault.store.retry import RetryStore

log = structlog.get_logger("configserver.registration")

MAX_SKEW_SECONDS = 300.0
NO_CLOCK_WARNING = ("the vault is a local folder: there is no reference clock, so this "
                    "machine's clock was not checked; keep it synchronised (NTP)")


MALFORMED_HINT = ("make one with 'siterecovery vault registration-key --out FILE' and pass "
                  "that file unchanged")


def _parse(text: str) -> RegistrationKey:
    try:
        return parse_key(text)
    except MalformedKey as e:
        raise InvalidRequest("registration_key_malformed", f"not a registration key file: {e}",
                             MALFORMED_HINT) from None


@dataclass
class Outcome:
    row: db.Registration
    warnings: list[str]
    reference: str  # "storage" (the service's Date header) | "none" (a local folder)


def _vault_key_path(default: str, given: str | None) -> str:
    path = given or default
    if not path:
        raise InvalidRequest("vault_key_missing", "no vault key file to open the vault with",
                             "pass --vault-key FILE (a path on the configuration server) or set "
                             "vault_key_file in its configuration")
    if not os.path.isabs(path):
        raise InvalidRequest("vault_key_unreadable", f"vault key file {path!r} is not an "
                             "absolute path", "give the full path of the key file on the "
                             "configuration server")
    return path


async def open_vault(url: str, key_path: str) -> Vault:
    try:
        km = KeyMaterial(keyfile=read_keyfile(key_path))
    except WrongKeyError as e:
        raise InvalidRequest("vault_key_unreadable", str(e),
                             "give the vault's key file (0600) as a path on the configuration "
                             "server") from None
    except (OSError, ValueError) as e:
        raise InvalidRequest("vault_key_unreadable",
                             f"cannot read vault key file {key_path!r}: "
                             f"{getattr(e, 'strerror', None) or e}",
                             "check the path and that the configuration server may read it") \
            from None
    try:
        store = RetryStore(open_backend(url), attempts=3)
    except (PermanentStoreError, ValueError) as e:
        raise InvalidRequest("vault_unreachable", f"cannot open the store {url!r}: {e}",
                             "the registration key names the store; pass --vault URL to reach the "
                             "same store another way (credentials file)") from None
    try:
        return await Vault.open(store, km)
    except WrongKeyError:
        await store.close()
        raise Refused("registration_key_foreign",
                      f"the vault key {key_path} does not open the vault at {store.url} that "
                      "the registration key names: the key file belongs to another vault",
                      "use the key file of the vault the registration key came from, or a "
                      "registration key from this key's vault") from None
    except NotFoundError as e:
        await store.close()
        raise InvalidRequest("vault_not_found", str(e), "check the vault URL") from None
    except StoreError as e:
        await store.close()
        raise Unavailable("vault_unreachable", f"cannot read the vault at {store.url}: {e}",
                          "check the network and the storage credentials, then try again") \
            from None
    except OSError as e:
        await store.close()
        raise InvalidRequest("vault_unreadable", f"cannot read the vault at {store.url}: {e}",
                             "check the vault URL and the permissions") from None
    except VaultError as e:
        await store.close()
        msg = str(e)
        code = "vault_not_found" if msg.startswith("no vault at") else "vault_unreadable"
        raise InvalidRequest(code, msg, "check the vault URL and run 'siterecovery check'") \
            from None


async def register(core: Core, default_key_file: str, key_text: str,
                   vault_key_file: str | None, vault_url: str | None) -> Outcome:
    """Verify a registration key and, if every check passes, record the registration.
    ``default_key_file`` is the configured vault key file (used when none is given).
    Raises a ``DomainError`` subclass naming the first check that failed."""
    key = _parse(key_text)
    now = core.clock()
    if now > key.expires:
        raise RegistrationExpired(
            "registration_key_expired",
            f"the registration key expired at {iso(key.expires)} (this server's clock says "
            f"{iso(now)}); keys are valid for {VALID_DAYS} days",
            "make a new one: siterecovery vault registration-key --out FILE")
    key_path = _vault_key_path(default_key_file, vault_key_file)
    url = vault_url or key.vault_url
    vault = await open_vault(url, key_path)
    try:
        if vault.config.vault_id != key.vault_id:
            raise Refused("registration_key_foreign",
                          f"the registration key is for vault {key.vault_id}, but the vault "
                          f"at {vault.store.url} is {vault.config.vault_id}",
                          "make a registration key from the vault to register with")
        if not key.authentic(vault.keyring.master_key):
            raise Refused("registration_key_forged",
                          "the registration key's authentication code does not match: it was "
                          "changed after it was made, or not made with this vault's key",
                          "make a new one: siterecovery vault registration-key --out FILE")
        async with core.sessionmaker() as s:
            current = await s.get(db.Registration, 1)
        if current is not None and current.vault_id != key.vault_id:
            raise Conflict("registered_elsewhere",
                           f"this configuration server is registered with vault "
                           f"{current.vault_id}; a key for vault {key.vault_id} cannot replace "
                           "it", "a configuration server serves one vault: register another "
                           "server, or use a key from the registered vault")
        try:
            t0 = core.clock()
            reference = await vault.store.server_time()
            local = (t0 + core.clock()) / 2
        except StoreError as e:
            raise Unavailable("vault_unreachable", f"cannot read the storage service's "
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
            raise ClockSkew("clock_skew",
                            f"this machine's clock is {abs(skew):.0f} seconds "
                            f"{'ahead of' if skew > 0 else 'behind'} the storage service's "
                            f"clock (its Date header); registration needs them within "
                            f"{MAX_SKEW_SECONDS / 60:.0f} minutes",
                            "synchronise this machine's clock (timedatectl set-ntp true, or "
                            "chrony), then register again")
    if key.issued > now + MAX_SKEW_SECONDS:  # judged once this server's clock is known good
        raise InvalidRequest("registration_key_not_yet_valid",
                             f"the registration key was issued at {iso(key.issued)}, in the future "
                             f"of this server's clock ({iso(now)})",
                             "the clock of the machine that made the key is wrong: synchronise it "
                             "(NTP) and make a new key")
    async with core.sessionmaker() as s:
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
    await core.notify()
    return Outcome(row, warnings, "none" if reference is None else "storage")


async def current(core: Core) -> db.Registration | None:
    async with core.sessionmaker() as s:
        return await s.get(db.Registration, 1)
