"""The registration key file: a vault's 5-day admission ticket for a configuration server.

A registration key file (``siterecovery vault registration-key``) is JSON::

    {"format": "siterecovery-registration-key", "version": 1, "key_id": 16 hex,
     "vault_id": the vault's id, "vault_url": its store URL (no secrets: credentials
     come from files or the environment), "issued": ISO 8601 UTC, "expires": ISO 8601 UTC,
     "mac": 64 hex}

``mac`` is HMAC-SHA256 over the canonical JSON (sorted keys, no spaces) of every
other field, keyed by HKDF-SHA256(vault master key, info "siterecovery registration-key
v1"): only a holder of the vault's key can make one, and no field can be changed.
A key is valid for at most ``VALID_DAYS`` days from its issue.

This module is the format only: making, writing, parsing and authenticating a key.
The configuration server's admission checks (expiry by its clock, the vault it names,
clock skew) are in ``configserver/registration.py``.
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
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.fs import atomic_write
from common.timefmt import iso_seconds
from vault.repo import Vault

FORMAT = "siterecovery-registration-key"
VERSION = 1
HKDF_INFO = b"siterecovery registration-key v1"
VALID_DAYS = 5
MAX_KEY_BYTES = 16 << 10
FIELDS = ("format", "version", "key_id", "vault_id", "vault_url", "issued", "expires", "mac")
_HEX = re.compile(r"[0-9a-f]+")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


class MalformedKey(ValueError):
    """Not a registration key file; ``str(e)`` says which rule it breaks."""


def mac_key(master: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(master)


def mac(master: bytes, fields: dict[str, Any]) -> str:
    """The authentication code of a key's ``fields`` (its own ``mac`` left out)."""
    body = json.dumps({k: v for k, v in fields.items() if k != "mac"}, sort_keys=True,
                      separators=(",", ":")).encode()
    return hmac.new(mac_key(master), body, hashlib.sha256).hexdigest()


def make_key(vault: Vault, vault_url: str, now: float, valid_days: float = VALID_DAYS
             ) -> dict[str, Any]:
    """A registration key for ``vault`` (opened with its key), valid from ``now``.
    Raises ``ValueError`` unless 0 < ``valid_days`` <= ``VALID_DAYS``."""
    if not 0 < valid_days <= VALID_DAYS:
        raise ValueError(f"a registration key is valid for at most {VALID_DAYS} days")
    fields: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "key_id": secrets.token_hex(8),
        "vault_id": vault.config.vault_id, "vault_url": vault_url,
        "issued": iso_seconds(now), "expires": iso_seconds(now + valid_days * 86400)}
    fields["mac"] = mac(vault.keyring.master_key, fields)
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

    def authentic(self, master: bytes) -> bool:
        """Whether the key was made with (and unchanged since) the vault key ``master``."""
        return hmac.compare_digest(mac(master, self.fields), self.fields["mac"])


def _time(fields: dict[str, Any], name: str) -> float:
    v = fields[name]
    if not isinstance(v, str) or not _TIME.fullmatch(v):
        raise MalformedKey(f"{name!r} must be a UTC time like 2026-01-31T12:00:00Z")
    try:
        return dt.datetime.fromisoformat(v).timestamp()
    except ValueError:
        raise MalformedKey(f"{name!r} is not a valid time") from None


def parse_key(text: str) -> RegistrationKey:
    """Check a key file's structure (not its MAC: that needs the vault's key).
    Raises ``MalformedKey``."""
    if len(text.encode()) > MAX_KEY_BYTES:
        raise MalformedKey(f"larger than {MAX_KEY_BYTES} bytes")
    try:
        fields = json.loads(text)
    except ValueError:
        raise MalformedKey("it is not JSON") from None
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        raise MalformedKey(f"'format' must be {FORMAT!r}")
    if fields.get("version") != VERSION:
        raise MalformedKey(f"version {fields.get('version')!r} is not {VERSION}")
    if sorted(fields) != sorted(FIELDS):
        raise MalformedKey(f"it must have exactly the fields {', '.join(FIELDS)}")
    for name, length in (("key_id", 16), ("vault_id", 32), ("mac", 64)):
        v = fields[name]
        if not isinstance(v, str) or len(v) != length or not _HEX.fullmatch(v):
            raise MalformedKey(f"{name!r} must be {length} lowercase hex digits")
    if not isinstance(fields["vault_url"], str) or not 0 < len(fields["vault_url"]) <= 2048:
        raise MalformedKey("'vault_url' must be a store URL")
    issued, expires = _time(fields, "issued"), _time(fields, "expires")
    if not 0 < expires - issued <= VALID_DAYS * 86400:
        raise MalformedKey(f"it must expire after it was issued, within {VALID_DAYS} days")
    return RegistrationKey(fields, fields["key_id"], fields["vault_id"], fields["vault_url"],
                           issued, expires)
