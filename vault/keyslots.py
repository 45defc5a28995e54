"""Key slots: the master key wrapped by key-encryption keys.

A vault has one master key, never stored unwrapped. Each ``keys/<slot>`` object
is plaintext JSON holding the master key wrapped (AES-256-GCM) by a KEK that comes
from a key file (32 random bytes) or a passphrase (scrypt, memory-hard). Adding or
removing a slot re-wraps; data is never re-encrypted.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from common.fs import create_exclusive
from common.timefmt import now_iso
from vault.errors import FormatError, WrongKeyError

KEYFILE_MAGIC = "siterecovery-keyfile v1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MAX_KEYFILE = 4096  # bytes read from a key file, far above the ~70 one holds


@dataclass(frozen=True)
class KeyMaterial:
    """What an operator unlocks a vault with: a key file's bytes or a passphrase."""

    keyfile: bytes | None = None
    passphrase: str | None = None

    def __repr__(self) -> str:
        return "KeyMaterial(<secret>)"


def new_keyfile(path: str | os.PathLike[str]) -> bytes:
    """Create a key file (mode 0600) holding a fresh 32-byte KEK; refuse to overwrite."""
    kek = secrets.token_bytes(32)
    text = f"{KEYFILE_MAGIC}\n{base64.b64encode(kek).decode()}\n"
    # The file and its directory entry are durable before the slot that needs it is
    # written: a crash right after ``vault key add`` must not lose the new key file.
    create_exclusive(path, text)
    return kek


def read_keyfile(path: str | os.PathLike[str]) -> bytes:
    """The 32-byte KEK in the key file at ``path``.

    Every way the file fails to give one (missing, unreadable, a directory, not text, not
    a key file, damaged) is a ``WrongKeyError`` naming the file: the key does not open the
    vault, and the operator must be told which file to look at.
    """
    try:
        # A key file is ~70 bytes; reading a bounded prefix keeps a mistaken path
        # (a disk image, /dev/urandom) from being read whole.
        with open(path, "rb") as f:
            raw = f.read(MAX_KEYFILE + 1)
        if len(raw) > MAX_KEYFILE:
            raise WrongKeyError(f"{str(path)!r} is not a siterecovery key file (too large)")
        lines = raw.decode("utf-8").split()
    except FileNotFoundError:
        raise WrongKeyError(f"key file {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        # Random bytes, a binary file, another encoding: not a key file we wrote.
        raise WrongKeyError(f"{str(path)!r} is not a siterecovery key file "
                            "(it is not text)") from None
    except OSError as e:
        raise WrongKeyError(f"cannot read key file {str(path)!r}: {e.strerror}") from None
    if len(lines) != 3 or " ".join(lines[:2]) != KEYFILE_MAGIC:
        raise WrongKeyError(f"{str(path)!r} is not a siterecovery key file")
    try:
        kek = base64.b64decode(lines[2], validate=True)
    except ValueError:
        raise WrongKeyError(f"key file {str(path)!r} is damaged") from None
    if len(kek) != 32:
        raise WrongKeyError(f"key file {str(path)!r} is damaged")
    return kek


def _ad(slot: str) -> bytes:
    return b"siterecovery/v1/keyslot/" + slot.encode()


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def wrap(master: bytes, km: KeyMaterial) -> tuple[str, bytes]:
    """Return ``(slot_id, slot_json)`` wrapping ``master`` under ``km``."""
    slot = secrets.token_hex(8)
    doc: dict[str, object] = {"format": 1, "slot": slot}
    if km.keyfile is not None:
        kek = km.keyfile
        doc["kind"] = "keyfile"
        doc["kdf"] = {"name": "none"}
    elif km.passphrase is not None:
        salt = secrets.token_bytes(16)
        kek = _scrypt(km.passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        doc["kind"] = "passphrase"
        doc["kdf"] = {
            "name": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": base64.b64encode(salt).decode(),
        }
    else:
        raise WrongKeyError("no key file or passphrase given")
    doc["created"] = now_iso()
    nonce = secrets.token_bytes(12)
    doc["nonce"] = base64.b64encode(nonce).decode()
    doc["wrapped"] = base64.b64encode(AESGCM(kek).encrypt(nonce, master, _ad(slot))).decode()
    return slot, json.dumps(doc, sort_keys=True).encode()


@dataclass(frozen=True)
class SlotDoc:
    """A parsed key slot. Only ``wrapped`` is authenticated (by the KEK); the rest is
    plaintext that storage could alter, which can only make the slot fail to open."""

    slot: str
    kind: str  # "keyfile", "passphrase", or a kind this program does not know
    nonce: bytes
    wrapped: bytes
    kdf: dict[str, Any] = field(default_factory=dict)  # name, n, r, p (no salt)
    salt: bytes = b""
    created: str | None = None  # absent in slots written before it was recorded


def parse_slot(slot_json: bytes) -> SlotDoc:
    """Parse and bound-check a slot; ``FormatError`` if it is damaged or excessive."""
    try:
        doc = json.loads(slot_json)
        slot = doc["slot"]
        kind = doc["kind"]
        nonce = base64.b64decode(doc["nonce"], validate=True)
        wrapped = base64.b64decode(doc["wrapped"], validate=True)
        kdf = doc["kdf"]
        created = doc.get("created")
        if not isinstance(slot, str) or not isinstance(kind, str) or not isinstance(kdf, dict) \
                or not isinstance(created, str | None):
            raise TypeError("a field has the wrong type")
        if len(nonce) != 12 or len(wrapped) <= 16:
            raise ValueError("nonce or wrapped key has the wrong length")
        params: dict[str, Any] = {"name": kdf.get("name")}
        salt = b""
        if kind == "passphrase":
            if kdf.get("name") != "scrypt":
                raise FormatError("key slot names an unsupported or excessive KDF")
            n, r, p = kdf["n"], kdf["r"], kdf["p"]
            if not all(type(x) is int and x >= 1 for x in (n, r, p)) or n < 2 or n & (n - 1):
                raise ValueError("scrypt parameters are not valid")
            if n > 2**20 or r > 32 or p > 16:
                raise FormatError("key slot names an unsupported or excessive KDF")
            salt = base64.b64decode(kdf["salt"], validate=True)
            params.update(n=n, r=r, p=p)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"damaged key slot: {e}") from None
    return SlotDoc(slot, kind, nonce, wrapped, params, salt, created)


def unwrap(slot_json: bytes, km: KeyMaterial) -> bytes | None:
    """Return the master key if ``km`` opens this slot, else ``None``."""
    doc = parse_slot(slot_json)
    if doc.kind == "keyfile" and km.keyfile is not None:
        kek = km.keyfile
    elif doc.kind == "passphrase" and km.passphrase is not None:
        kek = _scrypt(km.passphrase, doc.salt, doc.kdf["n"], doc.kdf["r"], doc.kdf["p"])
    else:
        return None
    try:
        return AESGCM(kek).decrypt(doc.nonce, doc.wrapped, _ad(doc.slot))
    except InvalidTag:
        return None
