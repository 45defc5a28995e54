"""Registration with a vault: the registration key file, and every way a key is refused —
malformed, expired, forged, foreign, a skewed clock (a real offset: libfaketime) — with
nothing recorded when it is. Through the real CLI and HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import secrets
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from configserver.config import ConfigServerConfig
from configserver.schema import iso
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.backends import missing_backend
from tests.helpers import REPO, Daemon, make_vault, write_toml

NOT_REGISTERED = {"registered": False, "vault_id": None, "vault_url": None, "key_id": None,
                  "registered_at": None, "key_expires": None, "skew_seconds": None,
                  "vault_key_file": None}


def faketime(offset: str) -> dict[str, str]:
    """Environment that runs a process with its wall clock moved by ``offset`` (+10m, -6d)."""
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not libs:
        missing_backend("libfaketime", "run tests/run.sh, which installs Debian's faketime")
    return {"FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1", "LD_PRELOAD": libs[0]}


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The real CLI in a subprocess, without blocking the loop the servers run on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "siterecovery", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def new_key(vault: str, vault_key: Path, out: Path, *extra: str,
                  env: dict[str, str] | None = None) -> dict[str, Any]:
    rc, stdout, stderr = await cli("vault", "registration-key", "--vault", vault, "--key-file",
                                   str(vault_key), "--out", str(out), "--json", *extra, env=env)
    assert rc == 0, stderr
    assert json.loads(stdout)["key_file"] == str(out)
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


async def vault_in(d: Path) -> tuple[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    return await make_vault(d)


def api_args(cs: ConfigServer) -> list[str]:
    return ["--api", cs.url, "--token-file", str(cs.cfg.token_path)]


async def test_registration_key_file(tmp_path: Path) -> None:
    url, key = await vault_in(tmp_path)
    out = tmp_path / "reg.key"
    doc = await new_key(url, key, out)
    assert out.stat().st_mode & 0o777 == 0o600
    assert set(doc) == {"format", "version", "key_id", "vault_id", "vault_url", "issued",
                        "expires", "mac"}
    assert doc["vault_url"] == url and len(doc["vault_id"]) == 32
    valid = datetime.fromisoformat(doc["expires"]) - datetime.fromisoformat(doc["issued"])
    assert valid.total_seconds() == 5 * 86400  # valid 5 days by default
    assert len(doc["mac"]) == 64

    # Bad usage writes nothing.
    for bad in (["--valid-days", "6"], ["--valid-days", "0"]):
        rc, _, err = await cli("vault", "registration-key", "--vault", url, "--key-file",
                               str(key), "--out", str(tmp_path / "no.key"), *bad)
        assert rc == 2 and "--valid-days must be 1-5" in err
    assert not (tmp_path / "no.key").exists()
    # Only the vault's key makes one.
    other = await vault_in(tmp_path / "other")
    rc, _, err = await cli("vault", "registration-key", "--vault", url, "--key-file",
                           str(other[1]), "--out", str(tmp_path / "no.key"))
    assert rc == 4, err
    assert not (tmp_path / "no.key").exists()


async def test_register_local_vault_warns_there_is_no_reference_clock(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    url, vault_key = await vault_in(tmp_path)
    doc = await new_key(url, vault_key, tmp_path / "reg.key")
    assert await api.get("/api/v1/registration") == NOT_REGISTERED
    rc, out, err = await cli("register", "--key-file", str(tmp_path / "reg.key"),
                             "--vault-key", str(vault_key), *api_args(cs))
    assert rc == 0, err
    assert out.startswith("warning: the vault is a local folder: there is no reference clock")
    assert f"registered with vault {doc['vault_id']}" in out
    status = await api.get("/api/v1/registration")
    assert status == {"registered": True, "vault_id": doc["vault_id"], "vault_url": url,
                      "key_id": doc["key_id"], "registered_at": status["registered_at"],
                      "key_expires": doc["expires"], "skew_seconds": None,
                      "vault_key_file": str(vault_key)}  # the key file's path, never the key
    rc, out, _ = await cli("register", "--status", "--json", *api_args(cs))
    assert rc == 0 and json.loads(out) == status

    # Registering again with a new key of the same vault updates the registration.
    doc2 = await new_key(url, vault_key, tmp_path / "reg2.key")
    again = await api.post("/api/v1/registration", {
        "key": (tmp_path / "reg2.key").read_text(), "vault_key_file": str(vault_key)})
    assert again["key_id"] == doc2["key_id"] and again["clock_reference"] == "none"
    assert again["warnings"] and "no reference clock" in again["warnings"][0]
    # A key from another vault cannot replace it: refused, nothing changed.
    url_b, key_b = await vault_in(tmp_path / "b")
    before = await api.get("/api/v1/registration")
    with pytest.raises(ApiCallError) as e:
        await api.post("/api/v1/registration", {
            "key": json.dumps(await new_key(url_b, key_b, tmp_path / "b.key")),
            "vault_key_file": str(key_b)})
    assert e.value.status == 409 and e.value.api_code == "registered_elsewhere"
    assert await api.get("/api/v1/registration") == before


def _t(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _flip(text: str) -> str:
    i = len(text) // 2
    return text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1:]


async def test_refused_keys_change_nothing(cs: ConfigServer, api: ApiClient,
                                           tmp_path: Path) -> None:
    url, vault_key = await vault_in(tmp_path / "a")
    good = await new_key(url, vault_key, tmp_path / "good.key")
    # A key made six days ago (the issuing CLI's clock really moved back: libfaketime).
    expired = await new_key(url, vault_key, tmp_path / "old.key", env=faketime("-6d"))
    url_b, key_b = await vault_in(tmp_path / "b")
    foreign = await new_key(url_b, key_b, tmp_path / "b.key")

    def with_(**kw: Any) -> str:
        return json.dumps({**good, **kw})

    later = "2099-01-01T00:00:00Z"
    cases: list[tuple[str, dict[str, Any], int, str, str]] = [
        ("not JSON", {"key": "hello"}, 422, "registration_key_malformed", "not JSON"),
        ("a field missing", {"key": json.dumps({k: v for k, v in good.items() if k != "mac"})},
         422, "registration_key_malformed", "exactly the fields"),
        ("bad time", {"key": with_(expires="tomorrow")}, 422, "registration_key_malformed",
         "UTC time"),
        ("valid too long", {"key": with_(expires=later)}, 422, "registration_key_malformed",
         "within 5 days"),
        ("expired", {"key": json.dumps(expired)}, 422, "registration_key_expired",
         "expired at"),
        ("MAC changed", {"key": with_(mac=_flip(good["mac"]))}, 403,
         "registration_key_forged", "authentication code does not match"),
        ("expiry moved", {"key": with_(expires=iso(_t(good["issued"]) + 4 * 86400 + 1))},
         403, "registration_key_forged", "does not match"),
        ("store URL changed", {"key": with_(vault_url=url_b)}, 403, "registration_key_foreign",
         "does not open the vault"),
        ("another vault's key", {"key": json.dumps(foreign)}, 403, "registration_key_foreign",
         "belongs to another vault"),
        ("vault id changed", {"key": with_(vault_id=foreign["vault_id"])}, 403,
         "registration_key_foreign", "but the vault at"),
        ("another vault's key pointed at this vault's store",
         {"key": json.dumps(foreign), "vault_url": url}, 403, "registration_key_foreign",
         f"is for vault {foreign['vault_id']}"),
        ("no vault key", {"key": json.dumps(good), "vault_key_file": None}, 422,
         "vault_key_missing", "no vault key file"),
        ("relative vault key path", {"key": json.dumps(good), "vault_key_file": "vault.key"},
         422, "vault_key_unreadable", "absolute path"),
        ("vault key not there", {"key": json.dumps(good),
                                 "vault_key_file": str(tmp_path / "nope.key")},
         422, "vault_key_unreadable", "does not exist"),
        ("no vault at the URL", {"key": json.dumps(good),
                                 "vault_url": f"file://{tmp_path / 'empty'}"},
         422, "vault_not_found", "no vault at"),
    ]
    for what, body, status, code, words in cases:
        body = {"vault_key_file": str(vault_key), **body}
        if body["vault_key_file"] is None:
            del body["vault_key_file"]
        if what == "another vault's key":
            body["vault_key_file"] = str(vault_key)  # vault A's key, for a key from vault B
        with pytest.raises(ApiCallError) as e:
            await api.post("/api/v1/registration", body)
        assert (e.value.status, e.value.api_code) == (status, code), (what, e.value)
        assert words in e.value.message, (what, e.value.message)
        assert e.value.hint, what
        assert await api.get("/api/v1/registration") == NOT_REGISTERED, what

    # The CLI says it clearly and exits non-zero.
    (tmp_path / "forged.key").write_text(with_(mac=_flip(good["mac"])))
    rc, _, err = await cli("register", "--key-file", str(tmp_path / "forged.key"),
                             "--vault-key", str(vault_key), *api_args(cs))
    assert rc == 1 and "does not match" in err and "hint: make a new one" in err, err
    rc, _, err = await cli("register", "--key-file", str(tmp_path / "old.key"),
                             "--vault-key", str(vault_key), *api_args(cs))
    assert rc == 2 and "expired" in err, err
    assert await api.get("/api/v1/registration") == NOT_REGISTERED
    # And the good key still works after all that.
    ok = await api.post("/api/v1/registration", {"key": json.dumps(good),
                                                  "vault_key_file": str(vault_key)})
    assert ok["registered"] is True and ok["vault_id"] == good["vault_id"]


async def test_key_expiry_is_judged_by_the_servers_clock(catalog_url: str,
                                                         tmp_path: Path) -> None:
    url, vault_key = await vault_in(tmp_path)
    key = await new_key(url, vault_key, tmp_path / "reg.key")
    clock = [time.time() + 5 * 86400 + 60]  # five days and a minute later
    server = ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0,
                                             site_port=-1, database_url=catalog_url,
                                             vault_key_file=str(vault_key)),
                          clock=lambda: clock[0])
    await server.start()
    try:
        async with ApiClient(server.url, server.admin_token) as api:
            with pytest.raises(ApiCallError) as e:
                await api.post("/api/v1/registration", {"key": json.dumps(key)})
            assert e.value.api_code == "registration_key_expired"
            assert await api.get("/api/v1/registration") == NOT_REGISTERED
            clock[0] -= 120  # within the five days: accepted, with the config's vault key
            doc = await api.post("/api/v1/registration", {"key": json.dumps(key)})
            assert doc["registered"] and doc["vault_key_file"] == str(vault_key)
    finally:
        await server.stop()


# -- the clock check against Azure (Azurite) with a real offset ---------------------------

async def _daemon(tmp_path: Path, catalog_url: str, offset: str) -> Daemon:
    cfg = write_toml(tmp_path / "configserver.toml", {
        "data_dir": str(tmp_path / "cs"), "listen_port": 0, "site_port": -1,
        "database_url": catalog_url})
    d = Daemon(["configserver", "run", "--config", str(cfg)], "configserver_started",
               env=faketime(offset))
    await d.start()
    return d


async def test_clock_skew_is_refused_against_azure(catalog_url: str, azurite_conn: str,
                                                   tmp_path: Path) -> None:
    conn = tmp_path / "azure-conn"
    conn.write_text(azurite_conn)
    conn.chmod(0o600)
    vault = f"azure://c{secrets.token_hex(6)}/vault?connection_string_file={conn}"
    vault_key = tmp_path / "vault.key"
    rc, _, err = await cli("vault", "init", "--vault", vault, "--key-file", str(vault_key))
    assert rc == 0, err
    await new_key(vault, vault_key, tmp_path / "reg.key")
    token = tmp_path / "cs" / "api-token"

    for offset, seconds in (("+10m", 600), ("-10m", -600)):
        d = await _daemon(tmp_path, catalog_url, offset)
        try:
            api = f"http://127.0.0.1:{d.ready['port']}"
            rc, out, err = await cli("register", "--key-file", str(tmp_path / "reg.key"),
                                     "--vault-key", str(vault_key), "--api", api,
                                     "--token-file", str(token))
            assert rc == 2, out + err
            ahead = "ahead of" if seconds > 0 else "behind"
            assert f"seconds {ahead} the storage service's clock" in err, err
            assert "within 5 minutes" in err and "hint: synchronise" in err
            (ev,) = d.events("registration_refused")
            assert ev["reason"] == "clock_skew"
            assert abs(float(ev["skew_seconds"]) - seconds) < 5  # type: ignore[arg-type]
            async with ApiClient(api, token.read_text().strip()) as c:
                assert await c.get("/api/v1/registration") == NOT_REGISTERED
        finally:
            await d.stop()

    d = await _daemon(tmp_path, catalog_url, "+4m")  # within five minutes: accepted
    try:
        api = f"http://127.0.0.1:{d.ready['port']}"
        rc, out, err = await cli("register", "--key-file", str(tmp_path / "reg.key"),
                                 "--vault-key", str(vault_key), "--api", api,
                                 "--token-file", str(token), "--json")
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["registered"] and doc["clock_reference"] == "storage"
        assert doc["warnings"] == []
        assert 235 < doc["skew_seconds"] < 245  # measured against Azurite's Date header
        assert doc["vault_url"] == vault and doc["vault_key_file"] == str(vault_key)
        (ev,) = d.events("registered")
        assert str(ev["vault_url"]).startswith("azure://")
        assert "connection_string_file" not in str(ev)
    finally:
        await d.stop()
