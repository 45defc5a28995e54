"""The embedded installation's first start and restarts."""

from __future__ import annotations

from pathlib import Path

from siterecovery.embedded import ensure_vault
from tests.helpers import open_vault
from vault.keyslots import new_keyfile


async def test_first_start_creates_vault_and_key(tmp_path: Path) -> None:
    await ensure_vault(tmp_path)
    assert (tmp_path / "vault.key").stat().st_mode & 0o777 == 0o600
    v = await open_vault(tmp_path / "vault", tmp_path / "vault.key")
    vault_id = v.config.vault_id
    await v.close()
    await ensure_vault(tmp_path)  # a restart changes nothing
    v = await open_vault(tmp_path / "vault", tmp_path / "vault.key")
    assert v.config.vault_id == vault_id
    await v.close()


async def test_key_left_by_an_interrupted_first_start_is_used(tmp_path: Path) -> None:
    new_keyfile(tmp_path / "vault.key")  # the crash came before the vault was written
    await ensure_vault(tmp_path)
    v = await open_vault(tmp_path / "vault", tmp_path / "vault.key")
    await v.close()
