"""The process server opens its vault with a passphrase (from a file or the environment),
as every vault verb can, not only with a key file (#12 item 13)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from procserver.config import ProcServerConfig
from procserver.vaultaccess import key_material
from tests.helpers import (
    Daemon,
    Pki,
    agent_config,
    make_agent,
    make_disk,
    proc_config,
    restore_all,
    run_cli,
    running_procserver,
    sha256,
    write_toml,
)
from vault.errors import WrongKeyError
from vault.keyslots import KeyMaterial
from vault.repo import Vault
from vault.store.local import LocalStore

PASSPHRASE = "correct horse battery staple"


async def _passphrase_vault(d: Path) -> str:
    v = await Vault.create(LocalStore(d / "vault"), KeyMaterial(passphrase=PASSPHRASE))
    await v.close()
    return f"file://{d / 'vault'}"


def _toml(tmp: Path, pki: Pki, url: str, **keys: object) -> Path:
    cert, pkey = pki.server()
    return write_toml(tmp / "procserver.toml", {
        "data_dir": str(tmp / "procserver"), "vault_url": url, "tls_cert": cert,
        "tls_key": pkey, "tls_ca": pki.ca_path, "listen_port": 0, "metrics_port": 0,
        "vault_key_file": "", **keys})


async def test_a_passphrase_file_opens_the_vault_and_points_restore(
        tmp_path: Path, pki: Pki) -> None:
    url = await _passphrase_vault(tmp_path)
    pfile = tmp_path / "passphrase"
    pfile.write_text(PASSPHRASE + "\n")  # as an editor saves it: the newline is not part of it
    cfg = dataclasses.replace(proc_config(tmp_path, pki, url, tmp_path / "unused.key"),
                              vault_key_file="", vault_passphrase_file=str(pfile))
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 << 20, seed=31)
    async with running_procserver(cfg) as ps:
        assert ps.vaults.is_open
        agent = make_agent(agent_config(tmp_path, pki, "pp01", ps.port, {"sda": disk}))
        try:
            r = await agent.replicate_once()
        finally:
            agent.close()
        point_id = await ps.wait_point(r.cycle, timeout=60)
    v = await Vault.open(LocalStore(tmp_path / "vault"), KeyMaterial(passphrase=PASSPHRASE))
    try:
        got = await restore_all(v, await v.read_point(point_id), tmp_path / "out")
    finally:
        await v.close()
    assert got == {"sda": sha256(disk)}


async def test_procserver_run_with_the_passphrase_in_the_environment(
        tmp_path: Path, pki: Pki) -> None:
    url = await _passphrase_vault(tmp_path)
    toml = _toml(tmp_path, pki, url, vault_passphrase_env="SR_TEST_VAULT_PASSPHRASE")
    ps = Daemon(["procserver", "run", "--config", str(toml)], "procserver_started",
                env={"SR_TEST_VAULT_PASSPHRASE": PASSPHRASE})
    ready = await ps.start()
    try:
        assert ready["vault_open"] is True
    finally:  # a SIGTERM right at the start is a graceful stop (StopSignals)
        assert await ps.stop() == 0
    assert ps.events("procserver_stopped")
    # The passphrase is never logged.
    assert not any(PASSPHRASE in line for line in ps.lines)


@pytest.mark.parametrize(("keys", "code", "message"), [
    ({}, 2, "give the vault key"),
    ({"vault_passphrase_file": "/nonexistent", "vault_passphrase_env": "X"}, 2, "not both"),
    ({"vault_passphrase_env": "SR_TEST_UNSET_VARIABLE"}, 2, "SR_TEST_UNSET_VARIABLE"),
    ({"vault_passphrase_file": "/nonexistent/passphrase"}, 2,
     "key 'vault_passphrase_file': file '/nonexistent/passphrase' does not exist"),
    ({"vault_passphrase_env": "SR_TEST_WRONG"}, 4, "opens none of the"),
])
async def test_bad_passphrase_settings_get_their_documented_exit_codes(
        tmp_path: Path, pki: Pki, keys: dict[str, object], code: int, message: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = await _passphrase_vault(tmp_path)
    monkeypatch.delenv("SR_TEST_UNSET_VARIABLE", raising=False)
    monkeypatch.setenv("SR_TEST_WRONG", "not the passphrase")  # the subprocess inherits it
    toml = _toml(tmp_path, pki, url, **keys)
    r = run_cli("procserver", "run", "--config", str(toml))
    assert r.returncode == code, r.stdout + r.stderr
    assert message in r.stderr
    assert not (tmp_path / "procserver" / "procserver.db").exists()  # nothing was created


def test_every_way_a_passphrase_source_fails_names_it(tmp_path: Path) -> None:
    base = ProcServerConfig(data_dir=str(tmp_path), vault_url="file:///x", vault_key_file="",
                            tls_cert="c", tls_key="k", tls_ca="a")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for kw, want in (({"vault_passphrase_file": str(binary)}, "is not UTF-8 text"),
                     ({"vault_passphrase_file": str(empty)}, "is empty"),
                     ({"vault_passphrase_file": str(tmp_path / "nope")}, "does not exist"),
                     ({"vault_passphrase_file": str(tmp_path)}, "cannot read"),
                     ({}, "no vault key")):
        with pytest.raises(WrongKeyError, match=want) as e:
            key_material(dataclasses.replace(base, **kw))  # type: ignore[arg-type]
        if kw:
            assert "vault_passphrase_file" in str(e.value)
    good = tmp_path / "good"
    good.write_text(PASSPHRASE + "\r\n")
    km = key_material(dataclasses.replace(base, vault_passphrase_file=str(good)))
    assert km.passphrase == PASSPHRASE and km.keyfile is None
