"""A configuration server given its vault's URL and key file (``vault_url``,
``vault_key_file``) registers itself at start, through the real daemon: against a vault
that does not answer it tries again until it does; a vault that is not there is a refusal
it logs with the reason; a registered server is left as it is; the setting is checked."""

from __future__ import annotations

from pathlib import Path

from tests.backends import _free_port, azurite
from tests.helpers import Daemon, run_cli, write_toml
from vault.keyslots import KeyMaterial, new_keyfile
from vault.repo import Vault
from vault.store.open import open_store


def _daemon(tmp: Path, **settings: object) -> Daemon:
    toml = write_toml(tmp / "configserver.toml", {"data_dir": str(tmp / "cs"),
                                                  "listen_port": 0, "site_port": -1,
                                                  **settings})
    return Daemon(["configserver", "run", "--config", str(toml)], "configserver_started")


async def test_a_vault_that_does_not_answer_is_tried_again_until_it_does(
        tmp_path: Path) -> None:
    port, blobs, conn = _free_port(), tmp_path / "azurite", tmp_path / "azure.conn"
    url, key = f"azure://selfreg/site1?connection_string_file={conn}", tmp_path / "vault.key"
    with azurite(blobs, port) as text:
        conn.write_text(text)
        store = open_store(url)
        try:
            vault_id = (await Vault.create(store, [KeyMaterial(keyfile=new_keyfile(key))])
                        ).config.vault_id
        finally:
            await store.close()
    cs = _daemon(tmp_path, vault_url=url, vault_key_file=str(key))  # Azurite is down
    await cs.start()
    try:
        [retrying] = await cs.wait_events("self_registration_retrying", 1, timeout=60)
        assert "selfreg" in str(retrying["error"]) and not cs.events("registered")
        with azurite(blobs, port):  # up again: the next try registers
            [registered] = await cs.wait_events("registered", 1, timeout=120)
        assert registered["vault"] == vault_id
    finally:
        assert await cs.stop() == 0
    again = _daemon(tmp_path, vault_url=url, vault_key_file=str(key))  # down again
    await again.start()
    try:  # registered: the vault is not even read
        [kept] = await again.wait_events("self_registration_not_needed", 1, timeout=60)
        assert kept["vault"] == vault_id and not again.events("self_registration_retrying")
    finally:
        assert await again.stop() == 0


async def test_a_vault_that_is_not_there_is_a_refusal_with_its_reason(
        tmp_path: Path) -> None:
    key = tmp_path / "vault.key"
    new_keyfile(key)
    cs = _daemon(tmp_path, vault_url=f"file://{tmp_path / 'nothing-here'}",
                 vault_key_file=str(key))
    await cs.start()
    try:
        [refused] = await cs.wait_events("self_registration_refused", 1, timeout=60)
        assert refused["code"] == "vault_not_found" and refused["hint"]
        assert not cs.events("registered")
    finally:
        assert await cs.stop() == 0


def test_a_vault_url_needs_an_absolute_key_file(tmp_path: Path) -> None:
    for key in ("", "vault.key"):
        toml = write_toml(tmp_path / "configserver.toml", {
            "data_dir": str(tmp_path / "cs"), "vault_url": f"file://{tmp_path}/v",
            "vault_key_file": key})
        r = run_cli("configserver", "run", "--config", str(toml))
        assert r.returncode == 2, r.stderr
        assert "vault_url needs vault_key_file" in r.stderr
