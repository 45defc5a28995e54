"""Push-install accounts: secrets sealed under a key outside the database, never returned,
never logged — through the real admin API and CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from configserver import sealed
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from siterecovery.logs import configure
from tests.helpers import run_cli

PASSWORD = "s3cret-Push-Install-pw!"
ROTATED = "rotated-Second-Secret-42"


def ssh_keygen(where: Path, passphrase: str = "") -> str:
    """A real OpenSSH private key, made by ssh-keygen."""
    path = where / ("enc" if passphrase else "plain")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "test",
                    "-f", str(path)], check=True)
    return path.read_text()


def pem_key(password: bytes | None = None) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL
                             if password is None else serialization.PrivateFormat.PKCS8,
                             enc).decode()


def _body(name: str = "installer", secret: Any = PASSWORD, kind: str = "password",
          username: str = "root") -> dict[str, Any]:
    return {"name": name, "username": username, "kind": kind, "secret": secret}


async def _refused(coro: Any, status: int, code: str) -> ApiCallError:
    with pytest.raises(ApiCallError) as e:
        await coro
    assert (e.value.status, e.value.api_code) == (status, code), e.value
    assert e.value.message and e.value.hint
    return e.value


@contextmanager
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[list[str]]:
    """The daemons' structlog set-up (JSON lines on stdout) for the duration; yields the
    lines written, filled in on exit."""
    saved = structlog.get_config()
    capsys.readouterr()
    configure("debug")
    lines: list[str] = []
    try:
        yield lines
    finally:
        lines.extend(capsys.readouterr().out.splitlines())
        structlog.configure(**saved)


async def open_secret(cs: ConfigServer, name: str) -> bytes:
    """What the push installer gets: the account's secret, opened with the server's key."""
    return await sealed.open_secret(cs.services, cs.cfg.secrets_key_path, name)


async def raw_account_rows(cs: ConfigServer, catalog_url: str) -> bytes:
    """Every byte of the accounts table as the database holds it, read behind the server's
    back: the SQLite files themselves, or the PostgreSQL rows in their text form."""
    if catalog_url.startswith("sqlite"):
        path = Path(catalog_url.split("///", 1)[1])
        files = [p for p in (path, Path(f"{path}-wal")) if p.exists()]
        return b"".join(p.read_bytes() for p in files)
    conn = await asyncpg.connect(catalog_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch("SELECT name, username, kind, secret, encode(secret, 'hex') "
                                "AS hex, created, updated FROM accounts")
    finally:
        await conn.close()
    return b"".join(bytes(v) if isinstance(v, bytes) else str(v).encode()
                    for r in rows for v in r.values())


async def test_secret_is_sealed_never_returned_never_logged(
        cs: ConfigServer, api: ApiClient, catalog_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    key_text = ssh_keygen(tmp_path)
    responses: list[Any] = []
    with json_logs(capsys) as lines:
        responses.append(await api.post("/api/v1/accounts", _body()))
        responses.append(await api.post("/api/v1/accounts", _body("keyed", key_text,
                                                                  "ssh-key", "deploy")))
        responses.append(await api.get("/api/v1/accounts"))
        responses.append(await api.get("/api/v1/accounts/installer"))
        # Refusals do not echo the secret either (not even a schema type error).
        for bad in (_body("bad", [PASSWORD]), _body("bad", PASSWORD + "\n"),
                    _body("bad", PASSWORD, "ssh-key"), _body("installer")):
            with pytest.raises(ApiCallError) as e:
                await api.post("/api/v1/accounts", bad)
            responses.append([e.value.message, e.value.hint])
        responses.append(await api.patch("/api/v1/accounts/installer", {"secret": ROTATED}))
    installer = responses[0]
    assert installer == {"name": "installer", "username": "root", "kind": "password",
                         "has_secret": True, "key_id": sealed.key_id(
                             sealed.read_key(cs.cfg.secrets_key_path)),
                         "machines": [], "created": installer["created"],
                         "updated": installer["updated"]}
    assert responses[1]["kind"] == "ssh-key" and "secret" not in responses[1]
    text = json.dumps(responses)
    secrets = [PASSWORD, ROTATED, key_text, key_text.splitlines()[1]]
    for s in secrets:
        assert s not in text
    # The logs said what happened, and nothing more.
    events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
    assert events.count("account_added") == 2 and "account_updated" in events
    for s in secrets:
        assert all(s not in line for line in lines)
    # The database holds sealed bytes only; they are there, and they open to the secret.
    raw = await raw_account_rows(cs, catalog_url)
    assert b"installer" in raw and b"deploy" in raw
    for s in secrets:
        assert s.encode() not in raw
        assert s.encode().hex().encode() not in raw
    assert await open_secret(cs, "installer") == ROTATED.encode()
    assert await open_secret(cs, "keyed") == key_text.encode()


async def test_secrets_key_is_created_at_first_start_outside_the_database(
        cs: ConfigServer, api: ApiClient, catalog_url: str) -> None:
    path = cs.cfg.secrets_key_path
    assert path.stat().st_mode & 0o777 == 0o600  # before any account exists
    key = sealed.read_key(path)
    a = await api.post("/api/v1/accounts", _body())
    assert a["key_id"] == sealed.key_id(key)
    raw = await raw_account_rows(cs, catalog_url)
    assert b"installer" in raw
    assert key not in raw and key.hex().encode() not in raw


async def test_add_list_show_update_remove(cs: ConfigServer, api: ApiClient,
                                           tmp_path: Path) -> None:
    a = await api.post("/api/v1/accounts", _body())
    k = await api.post("/api/v1/accounts", _body("keyed", pem_key(), "ssh-key", "deploy"))
    assert (k["kind"], k["username"]) == ("ssh-key", "deploy")
    listed = (await api.get("/api/v1/accounts"))["accounts"]
    assert [x["name"] for x in listed] == ["installer", "keyed"]
    assert listed[0] == a == await api.get("/api/v1/accounts/installer")

    # Rename the user only: the secret stays as it was.
    u = await api.patch("/api/v1/accounts/installer", {"username": "admin"})
    assert u["username"] == "admin" and u["kind"] == "password"
    assert await open_secret(cs, "installer") == PASSWORD.encode()
    # Rotate to an SSH key: kind and secret change together.
    key_text = ssh_keygen(tmp_path)
    u = await api.patch("/api/v1/accounts/installer", {"kind": "ssh-key", "secret": key_text})
    assert u["kind"] == "ssh-key"
    assert await open_secret(cs, "installer") == key_text.encode()
    e = await _refused(api.patch("/api/v1/accounts/installer", {"kind": "password"}), 422,
                       "secret_required")
    assert "needs the new secret" in e.message
    assert (await api.get("/api/v1/accounts/installer"))["kind"] == "ssh-key"

    assert await api.delete("/api/v1/accounts/keyed") == {"deleted": "keyed"}
    await _refused(api.get("/api/v1/accounts/keyed"), 404, "account_not_found")
    await _refused(api.delete("/api/v1/accounts/keyed"), 404, "account_not_found")
    await _refused(api.patch("/api/v1/accounts/keyed", {"username": "x"}), 404,
                   "account_not_found")
    with pytest.raises(sealed.SecretError) as err:
        await open_secret(cs, "keyed")
    assert err.value.code == "account_not_found"


@pytest.mark.parametrize("kind,secret,code,says", [
    ("password", "", "invalid_secret", "1 to 1024 characters"),
    ("password", "x" * 1025, "invalid_secret", "1 to 1024 characters"),
    ("password", PASSWORD + "\n2nd", "invalid_secret", "line breaks"),
    ("password", 12345678, "invalid_secret", "must be a string"),
    ("password", {"pw": PASSWORD}, "invalid_secret", "must be a string"),
    ("ssh-key", "not a key " + PASSWORD, "invalid_secret", "not a private key"),
    ("ssh-key", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI " + PASSWORD, "invalid_secret",
     "public key"),
    ("ssh-key", "ENCRYPTED-OPENSSH", "invalid_secret", "passphrase"),
    ("ssh-key", "ENCRYPTED-PEM", "invalid_secret", "passphrase"),
    ("ssh-key", "k" * 16385, "invalid_secret", "1 to 16384 characters"),
    ("telnet", PASSWORD, "invalid_request", "kind"),
])
async def test_bad_secrets_are_refused_without_echo(
        api: ApiClient, tmp_path: Path, kind: str, secret: Any, code: str, says: str) -> None:
    if secret == "ENCRYPTED-OPENSSH":
        secret = ssh_keygen(tmp_path, passphrase=PASSWORD)
    elif secret == "ENCRYPTED-PEM":
        secret = pem_key(PASSWORD.encode())
    await api.post("/api/v1/accounts", _body())
    before = await api.get("/api/v1/accounts")
    for call in (api.post("/api/v1/accounts", _body("new", secret, kind)),
                 api.patch("/api/v1/accounts/installer", {"kind": kind, "secret": secret})):
        e = await _refused(call, 422, code)
        assert says in e.message, e.message
        assert PASSWORD not in e.message + e.hint
    assert await api.get("/api/v1/accounts") == before


async def test_bad_fields_and_duplicates_change_nothing(api: ApiClient) -> None:
    first = await api.post("/api/v1/accounts", _body())
    await _refused(api.post("/api/v1/accounts", _body(secret=ROTATED)), 409, "account_exists")
    for bad in ({**_body("x"), "username": "root; rm -rf /"}, {**_body("x"), "extra": 1},
                {k: v for k, v in _body("x").items() if k != "secret"},
                {**_body("x"), "name": "../x"}):
        await _refused(api.post("/api/v1/accounts", bad), 422, "invalid_request")
    await _refused(api.patch("/api/v1/accounts/installer", {}), 422, "invalid_request")
    assert (await api.get("/api/v1/accounts"))["accounts"] == [first]


async def test_account_in_use_cannot_be_removed(api: ApiClient) -> None:
    await api.post("/api/v1/accounts", _body())
    await api.post("/api/v1/machines", {"name": "web01", "ip": "10.0.0.5", "os_type": "linux",
                                        "os_name": "debian", "os_version": "12",
                                        "account": "installer"})
    before = await api.get("/api/v1/accounts/installer")
    assert before["machines"] == ["web01"]
    assert (await api.get("/api/v1/accounts"))["accounts"][0]["machines"] == ["web01"]
    e = await _refused(api.delete("/api/v1/accounts/installer"), 409, "account_in_use")
    assert "web01" in e.message and "--no-account" in e.hint
    assert await api.get("/api/v1/accounts/installer") == before
    await api.patch("/api/v1/machines/web01", {"account": None})
    assert await api.delete("/api/v1/accounts/installer") == {"deleted": "installer"}


async def test_open_secret_says_clearly_what_is_wrong_with_the_key(
        cs: ConfigServer, api: ApiClient, catalog_url: str) -> None:
    await api.post("/api/v1/accounts", _body())
    await api.post("/api/v1/accounts", _body("other", ROTATED))
    path = cs.cfg.secrets_key_path
    good = path.read_text()

    async def refused(code: str, *says: str) -> None:
        with pytest.raises(sealed.SecretError) as e:
            await open_secret(cs, "installer")
        assert e.value.code == code, e.value
        for s in says:
            assert s in e.value.message + e.value.hint, e.value.message
        assert PASSWORD not in e.value.message + e.value.hint

    path.unlink()
    await refused("secrets_key_missing", str(path), "backup")
    # While accounts exist, a lost key is not silently replaced: adding one is refused.
    before = await api.get("/api/v1/accounts")
    e = await _refused(api.post("/api/v1/accounts", _body("third")), 503,
                       "secrets_key_missing")
    assert "remove every account" in e.hint
    assert await api.get("/api/v1/accounts") == before and not path.exists()

    sealed.create_key(path)  # another key
    await refused("secrets_key_mismatch", "was sealed under key id", sealed.key_id(
        bytes.fromhex(good.strip())), "secrets.key")
    path.unlink()
    path.write_text(good)
    path.chmod(0o644)
    await refused("secrets_key_exposed", "chmod 600")
    path.chmod(0o600)
    path.write_text("not hex\n")
    await refused("secrets_key_malformed", "does not hold a key")
    path.write_text(good)  # restored from the backup: works again, no restart
    assert await open_secret(cs, "installer") == PASSWORD.encode()

    # A sealed row copied onto another account does not open as that account's secret.
    if catalog_url.startswith("sqlite"):
        db = sqlite3.connect(catalog_url.split("///", 1)[1])
        with db:
            db.execute("UPDATE accounts SET secret = (SELECT secret FROM accounts WHERE "
                       "name = 'other') WHERE name = 'installer'")
        db.close()
    else:
        conn = await asyncpg.connect(catalog_url.replace("postgresql+asyncpg://",
                                                         "postgresql://"))
        await conn.execute("UPDATE accounts SET secret = (SELECT secret FROM accounts WHERE "
                           "name = 'other') WHERE name = 'installer'")
        await conn.close()
    await refused("secret_damaged", "does not authenticate")
    assert await open_secret(cs, "other") == ROTATED.encode()


async def test_lost_key_with_no_accounts_left_is_replaced(cs: ConfigServer,
                                                          api: ApiClient) -> None:
    await api.post("/api/v1/accounts", _body())
    path = cs.cfg.secrets_key_path
    path.unlink()
    await api.delete("/api/v1/accounts/installer")  # removing needs no key
    a = await api.post("/api/v1/accounts", _body())
    assert path.stat().st_mode & 0o777 == 0o600
    assert a["key_id"] == sealed.key_id(sealed.read_key(path))
    assert await open_secret(cs, "installer") == PASSWORD.encode()


# The CLI is the same over either catalog (the API tests run on both): SQLite only.
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_account_cli(cs: ConfigServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(cs.admin_token)
    api = ["--api", cs.url, "--token-file", str(token)]
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    key_text = ssh_keygen(tmp_path)
    outputs: list[str] = []

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        r = await asyncio.to_thread(run_cli, *args, *api)
        outputs.append(r.stdout + r.stderr)
        return r

    r = await cli("account", "add", "installer", "--username", "root", "--password-file",
                  str(pw))
    assert r.returncode == 0, r.stderr
    assert "kind:      password (stored sealed; never shown)" in r.stdout
    assert await open_secret(cs, "installer") == PASSWORD.encode()  # no newline
    r = await cli("account", "add", "keyed", "--username", "deploy", "--ssh-key-file",
                  str(tmp_path / "plain"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "ssh-key"
    r = await cli("account", "list")
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["NAME", "USER", "KIND", "MACHINES", "UPDATED"]
    assert [row.split()[:3] for row in rows] == [["installer", "root", "password"],
                                                 ["keyed", "deploy", "ssh-key"]]
    pw.write_text(ROTATED)
    r = await cli("account", "update", "installer", "--password-file", str(pw), "--json")
    assert r.returncode == 0, r.stderr
    assert await open_secret(cs, "installer") == ROTATED.encode()
    r = await cli("account", "show", "installer", "--json")
    assert json.loads(r.stdout)["has_secret"] is True

    r = await cli("account", "add", "x", "--username", "root")
    assert r.returncode == 2 and "--password-file" in r.stderr
    r = await cli("account", "add", "x", "--username", "root", "--ssh-key-file",
                  str(tmp_path / "plain.pub"))
    assert r.returncode == 2 and "public key" in r.stderr and "hint:" in r.stderr
    r = await cli("account", "add", "x", "--username", "root", "--password-file",
                  str(tmp_path / "missing"))
    assert r.returncode == 2 and "cannot read the password" in r.stderr
    r = await cli("account", "update", "installer")
    assert r.returncode == 2 and "nothing to change" in r.stderr

    r = await cli("account", "remove", "keyed")
    assert r.returncode == 0 and "removed" in r.stdout
    r = await cli("account", "list", "--json")
    assert [a["name"] for a in json.loads(r.stdout)["accounts"]] == ["installer"]
    for out in outputs:
        for s in (PASSWORD, ROTATED, key_text.splitlines()[1]):
            assert s not in out
