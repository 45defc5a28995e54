"""Opening a vault's key slots with the operator's key material: the one rule that
``Vault.open`` and ``check`` both follow.

The key material *unlocks* a slot when it unwraps the master key the slot holds; the
vault *opens* with the first slot, in name order, whose master key authenticates the
config. A slot that does not parse is damaged and skipped (one bad slot must not lock
out the others); a slot deleted since the listing is skipped. A slot that unlocks but
does not authenticate the config is typically left by an interrupted ``vault init``
(it wraps another master key); when every unlocked slot fails so, the config itself
is damaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vault import names
from vault.crypto import Keyring, ObjectType, unseal
from vault.errors import FormatError, IntegrityError, NotFoundError
from vault.keyslots import KeyMaterial, unwrap
from vault.store.protocol import BlobStore

MAX_CONFIG = 1 << 20


@dataclass
class SlotScan:
    """What the key material made of a vault's key slots."""

    slots: list[str]  # every key slot object listed (``keys/<id>``)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (slot object, why)
    unopened: list[str] = field(default_factory=list)  # slots the key material does not unlock
    unlocked: list[tuple[str, Keyring]] = field(default_factory=list)  # in slot order
    opened: str | None = None  # the first unlocked slot whose key authenticates the config
    keyring: Keyring | None = None  # that slot's keyring
    config: bytes | None = None  # the config's plaintext, authenticated by ``keyring``
    config_error: IntegrityError | None = None  # the last slot's failure to authenticate it


async def scan_key_slots(store: BlobStore, km: KeyMaterial, sealed_config: bytes | None, *,
                         every_slot: bool = False) -> SlotScan:
    """Try ``km`` on the key slots of the vault in ``store`` against ``sealed_config``.

    Stops at the first slot that opens the config, unless ``every_slot`` (a check reports
    every damaged slot; opening a vault need not run the KDF of the slots after the one
    that opens it). With ``sealed_config`` None (a check of a vault whose config is
    missing) nothing can be authenticated: ``opened`` stays None and ``unlocked`` says
    which slots the key material unlocks.

    Raises only the store's errors (other than ``NotFoundError`` for a slot deleted
    since the listing): damaged slots and a config that fails to authenticate are
    recorded in the result, for the caller to judge.
    """
    scan = SlotScan(slots=[b.name async for b in store.list(names.KEYS)])
    for slot in scan.slots:
        if scan.opened is not None and not every_slot:
            break
        try:
            master = unwrap(await store.get(slot), km)
            keyring = None if master is None else Keyring(master)
        except NotFoundError:
            continue  # removed since the listing
        except FormatError as e:
            scan.damaged.append((slot, str(e)))
            continue
        if keyring is None:
            scan.unopened.append(slot)
            continue
        scan.unlocked.append((slot, keyring))
        if scan.opened is not None or sealed_config is None:
            continue
        try:
            scan.config = unseal(keyring.aead(ObjectType.CONFIG, names.CONFIG),
                                 ObjectType.CONFIG, names.CONFIG, sealed_config,
                                 max_size=MAX_CONFIG)
        except IntegrityError as e:
            scan.config_error = e
            continue
        scan.opened, scan.keyring = slot, keyring
    return scan
