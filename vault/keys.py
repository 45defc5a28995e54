"""Key-slot management on an opened vault: list, add, remove, change a passphrase.

Every operation wraps the master key that the opened vault already holds under a
new key-encryption key (KEK), or deletes a slot. The master key never changes and
no data object is touched or re-encrypted: this rotates KEKs (key files and
passphrases), not the master key. Removing a slot stops its key file or passphrase
from opening the vault *as stored now*; whoever kept a copy of the slot object
together with its key, or the master key itself, can still read the vault.

Order matters for safety: a new slot is written (and read back) before an old one
is removed, and the last usable slot is never removed, so an interruption at any
point leaves at least one way in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vault import names
from vault.errors import FormatError, IntegrityError, NotFoundError, VaultError
from vault.keyslots import KeyMaterial, parse_slot, wrap
from vault.repo import Vault

KINDS = ("keyfile", "passphrase")


class KeySlotError(VaultError):
    """A key-slot operation was refused (it would lock the operator out)."""


@dataclass(frozen=True)
class SlotInfo:
    slot: str  # the id: last segment of the object name ``keys/<slot>``
    kind: str  # "keyfile", "passphrase", an unknown kind, or "damaged"
    kdf: dict[str, Any]  # {"name": ...} plus scrypt n, r, p; never the salt
    created: str | None  # None for slots written before the field existed
    in_use: bool  # this slot opened the vault being worked on
    error: str | None = None  # why the slot cannot be read, if it is damaged

    @property
    def usable(self) -> bool:
        """Structurally sound and of a kind this program can open."""
        return self.error is None and self.kind in KINDS

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.slot, "kind": self.kind, "kdf": self.kdf, "created": self.created,
                "in_use": self.in_use, "error": self.error}


def _master(vault: Vault) -> bytes:
    # The keyring keeps the master key private; only slot management needs it back.
    return vault.keyring.master_key


def _info(vault: Vault, slot: str, data: bytes) -> SlotInfo:
    in_use = slot == vault.slot
    try:
        doc = parse_slot(data)
    except FormatError as e:
        return SlotInfo(slot, "damaged", {}, None, in_use, str(e))
    return SlotInfo(slot, doc.kind, doc.kdf, doc.created, in_use)


async def list_slots(vault: Vault) -> list[SlotInfo]:
    """Every key slot of the vault, damaged ones included, oldest first."""
    out: list[SlotInfo] = []
    async for blob in vault.store.list(names.KEYS):
        try:
            data = await vault.store.get(blob.name)
        except NotFoundError:
            continue  # removed since the listing
        out.append(_info(vault, blob.name[len(names.KEYS):], data))
    out.sort(key=lambda s: (s.created or "", s.slot))
    return out


def find_slot(slots: list[SlotInfo], ref: str) -> SlotInfo:
    """The slot named by ``ref``: its id or a unique prefix of it."""
    exact = [s for s in slots if s.slot == ref]
    found = exact or [s for s in slots if ref and s.slot.startswith(ref)]
    if not found:
        raise KeySlotError(f"the vault has no key slot {ref!r}; see 'siterecovery vault key "
                           "list'")
    if len(found) > 1:
        raise KeySlotError(f"key slot prefix {ref!r} is ambiguous: "
                           f"{', '.join(s.slot for s in found)}")
    return found[0]


async def add_slot(vault: Vault, km: KeyMaterial) -> SlotInfo:
    """Wrap the vault's master key under ``km`` (one key file or one passphrase) in a
    new slot, and read it back: the slot exists, whole, when this returns."""
    if (km.keyfile is None) == (km.passphrase is None):
        raise KeySlotError("a new key slot takes exactly one key file or one passphrase")
    slot, doc = wrap(_master(vault), km)
    name = names.KEYS + slot
    try:
        await vault.store.stat(name)
    except NotFoundError:
        pass
    else:  # 64 random bits: never in practice, but never overwrite a slot
        raise KeySlotError(f"key slot {slot} already exists; run the command again")
    await vault.store.put(name, doc)
    if await vault.store.get(name) != doc:
        raise IntegrityError(name, "the new key slot does not read back as written")
    return _info(vault, slot, doc)


async def remove_slot(vault: Vault, ref: str, *, force: bool = False) -> SlotInfo:
    """Delete one key slot. Refused if it is the last usable slot, or (unless ``force``)
    if it is the slot that opened ``vault``."""
    slots = await list_slots(vault)
    target = find_slot(slots, ref)
    if not any(s.usable for s in slots if s.slot != target.slot):
        raise KeySlotError(f"refusing to remove key slot {target.slot}: it is the last usable "
                           "key slot, and without it nothing opens the vault. Add another key "
                           "first ('siterecovery vault key add').")
    if target.in_use and not force:
        raise KeySlotError(f"refusing to remove key slot {target.slot}: it is the slot the key "
                           "given to this command opens. Make sure another key file or "
                           "passphrase opens the vault, then repeat with --force.")
    name = names.KEYS + target.slot
    data = await vault.store.get(name)
    await vault.store.delete(name)
    # Someone removing another slot at the same time could leave none: put it back then.
    if not any(s.usable for s in await list_slots(vault)):
        await vault.store.put(name, data)
        raise KeySlotError(f"key slot {target.slot} was put back: another slot was removed "
                           "at the same time and none would have been left")
    return target


async def change_passphrase(vault: Vault, new_passphrase: str,
                            ref: str | None = None) -> tuple[SlotInfo, SlotInfo]:
    """Replace a passphrase slot (``ref``, default: the one that opened ``vault``) with a
    new one: the new slot is written first, then the old one is removed, so an
    interruption leaves both passphrases working, never neither.
    Returns ``(new slot, removed slot)``."""
    slots = await list_slots(vault)
    if ref is not None:
        old = find_slot(slots, ref)
    else:
        in_use = [s for s in slots if s.in_use]
        if not in_use or in_use[0].kind != "passphrase":
            raise KeySlotError("the vault was opened with a key file, not a passphrase: name "
                               "the passphrase slot to change with --slot (see 'siterecovery "
                               "vault key list')")
        old = in_use[0]
    if old.kind != "passphrase":
        raise KeySlotError(f"key slot {old.slot} is a {old.kind} slot, not a passphrase slot")
    new = await add_slot(vault, KeyMaterial(passphrase=new_passphrase))
    await remove_slot(vault, old.slot, force=True)
    return new, old
