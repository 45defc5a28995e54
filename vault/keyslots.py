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
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vault.errors import FormatError, WrongKeyError

KEYFILE_MAGIC = "siterecovery-keyfile v1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return kek


def read_keyfile(path: str | os.PathLike[str]) -> bytes:
    try:
        lines = Path(path).read_text().split()
    except FileNotFoundError:
        raise WrongKeyError(f"key file {str(path)!r} does not exist") from None
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
    nonce = secrets.token_bytes(12)
    doc["nonce"] = base64.b64encode(nonce).decode()
    doc["wrapped"] = base64.b64encode(AESGCM(kek).encrypt(nonce, master, _ad(slot))).decode()
    return slot, json.dumps(doc, sort_keys=True).encode()


def unwrap(slot_json: bytes, km: KeyMaterial) -> bytes | None:
    """Return the master key if ``km`` opens this slot, else ``None``."""
    try:
        doc = json.loads(slot_json)
        kdf = doc["kdf"]
        nonce = base64.b64decode(doc["nonce"])
        wrapped = base64.b64decode(doc["wrapped"])
        slot = str(doc["slot"])
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"damaged key slot: {e}") from None
    if doc.get("kind") == "keyfile" and km.keyfile is not None:
        kek = km.keyfile
    elif doc.get("kind") == "passphrase" and km.passphrase is not None:
        if kdf.get("name") != "scrypt" or int(kdf["n"]) > 2**20 or int(kdf["r"]) > 32 \
                or int(kdf["p"]) > 16:
            raise FormatError("key slot names an unsupported or excessive KDF")
        kek = _scrypt(
            km.passphrase, base64.b64decode(kdf["salt"]), int(kdf["n"]), int(kdf["r"]),
            int(kdf["p"]),
        )
    else:
        return None
    try:
        return AESGCM(kek).decrypt(nonce, wrapped, _ad(slot))
    except InvalidTag:
        return None
