"""Opening a vault for ``check``: by the rule ``Vault.open`` follows, but every damaged
key slot and a missing or damaged config are findings to report, not reasons to stop."""

from __future__ import annotations

from vault import names
from vault.checkreport import CheckReport
from vault.errors import IntegrityError, NotFoundError, VaultError
from vault.keyopen import scan_key_slots
from vault.keyslots import KeyMaterial
from vault.repo import Vault, VaultConfig
from vault.store.protocol import BlobStore


async def open_for_check(store: BlobStore, km: KeyMaterial, report: CheckReport
                         ) -> Vault | None:
    """Open the vault by the rule ``Vault.open`` follows (``vault/keyopen.py``), but
    report every damaged slot and a missing, damaged or malformed config and go on (a
    damaged config does not stop the data from being checked). None: wrong key.

    Raises ``VaultError`` if ``store`` holds neither a config nor a key slot,
    ``FormatError`` for a config of a newer format."""
    try:
        sealed_config: bytes | None = await store.get(names.CONFIG)
    except NotFoundError:
        sealed_config = None
    scan = await scan_key_slots(store, km, sealed_config, every_slot=True)
    if sealed_config is None and not scan.slots:
        raise VaultError(f"no vault at {store.url}")
    if sealed_config is None:
        report.add(names.CONFIG, "missing", "the vault config is missing")
    report.counts["key_slots"] = len(scan.slots)
    for slot, why in scan.damaged:
        report.add(slot, "damaged", why)
    if not scan.unlocked:
        report.wrong_key = True
        for slot in scan.unopened:
            report.add(slot, "wrong-key", "the key given does not open this key slot (a "
                                          "wrong key file or passphrase, or a damaged slot)")
        return None
    unknown = VaultConfig("", "", 0)
    if scan.keyring is None or scan.config is None:
        if scan.config_error is not None:  # None: the config is missing (reported above)
            report.add(names.CONFIG, "damaged", scan.config_error.reason)
        return Vault(store, scan.unlocked[0][1], unknown)
    try:
        config = VaultConfig.from_json(scan.config)
    except IntegrityError as e:
        report.add(names.CONFIG, "damaged", e.reason)
        return Vault(store, scan.keyring, unknown)
    return Vault(store, scan.keyring, config)
