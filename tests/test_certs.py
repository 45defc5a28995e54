"""The certificate authority and trust: every certificate recorded, enrollment with the
passphrase (throttled), renewal, revocation, expiry — and process servers that refuse a
disabled, removed or revoked machine. Real servers, real TLS, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import ssl
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog.testing
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from configserver.ca import Issued, write_bundle
from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.enroll import enroll_with_passphrase
from mobility.renewal import cert_not_after
from mobility.siteclient import SiteClient
from procserver import db as psdb
from procserver.config import ProcServerConfig
from procserver.server import ProcServer
from siterecovery.apiclient import ApiCallError, ApiClient
from siterecovery.tomlconfig import load
from tests.helpers import REPO, make_agent, make_disk, make_vault, running_procserver
from wire.protocol import RemoteError

MACHINE = {"ip": "10.0.0.5", "os_type": "linux", "os_name": "ubuntu", "os_version": "22.04"}


async def cli(*args: str) -> tuple[int, str, str]:
    """The real CLI in a subprocess, without blocking the loop the servers run on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "siterecovery", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def api_args(cs: ConfigServer) -> list[str]:
    return ["--api", cs.url, "--token-file", str(cs.cfg.token_path)]


def site_ssl(cs: ConfigServer, cert: str | None = None, key: str | None = None
             ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cs.ca.cert_path))
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


async def site_post(cs: ConfigServer, path: str, body: Any, ctx: ssl.SSLContext
                    ) -> tuple[int, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http, \
            http.post(cs.site_url + path, json=body) as r:
        return r.status, await r.json()


async def enroll(cs: ConfigServer, machine: str, passphrase: str | None = None
                 ) -> tuple[int, Any]:
    return await site_post(cs, "/api/v1/agent/enroll",
                           {"machine": machine, "passphrase": passphrase or cs.passphrase},
                           site_ssl(cs))


def serial_of(pem: str) -> str:
    return format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x")


async def certificates(api: ApiClient, **q: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = (await api.get("/api/v1/certificates", **q))["certificates"]
    return docs


@pytest.fixture
async def clocked(tmp_path: Path, catalog_url: str
                  ) -> AsyncIterator[tuple[ConfigServer, list[float]]]:
    """A configuration server whose clock the test moves: ``clock[0]`` is now, for it."""
    clock = [time.time()]
    server = ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0,
                                             site_port=0, database_url=catalog_url),
                          clock=lambda: clock[0])
    await server.start()
    try:
        yield server, clock
    finally:
        await server.stop()


# -- the catalog of certificates -------------------------------------------------------------

async def test_every_certificate_is_recorded_listed_and_revocable(cs: ConfigServer,
                                                                  api: ApiClient) -> None:
    # The site listener's own certificate is recorded at start.
    async with cs.changed:
        while not await certificates(api, kind="configserver"):
            await asyncio.wait_for(cs.changed.wait(), 30)
    (own,) = await certificates(api, kind="configserver")
    assert own["subject"] == "configserver" and own["state"] == "valid"

    issued = await api.post("/api/v1/certificates/agent", {"machine": "web01"})
    serial = serial_of(issued["cert"])
    assert issued["serial"] == serial and not serial.startswith("0")
    (doc,) = await certificates(api, kind="agent")
    assert doc == {"serial": serial, "subject": "web01", "kind": "agent", "state": "valid",
                   "issued_at": doc["issued_at"], "not_after": issued["not_after"],
                   "revoked_at": None}
    assert await api.get(f"/api/v1/certificates/{serial}") == doc
    assert await certificates(api, subject="web01", state="revoked") == []

    revoked = await api.post(f"/api/v1/certificates/{serial}/revoke")
    assert revoked["state"] == "revoked" and revoked["revoked_at"]
    assert await api.post(f"/api/v1/certificates/{serial}/revoke") == revoked  # idempotent
    assert await certificates(api, state="revoked") == [revoked]

    for path, status, code in ((f"/api/v1/certificates/{'f' * 40}/revoke", 404,
                                "certificate_not_found"),
                               ("/api/v1/certificates/NOT-HEX/revoke", 404, "not_found")):
        with pytest.raises(ApiCallError) as e:
            await api.post(path)
        assert (e.value.status, e.value.api_code) == (status, code)
    with pytest.raises(ApiCallError) as e:
        await api.post("/api/v1/certificates/agent", {"machine": "web01", "days": 0})
    assert e.value.status == 422
    assert len(await certificates(api, kind="agent")) == 1  # the refusal recorded nothing

    # The CLI over the same API.
    rc, out, err = await cli("cert", "list", "--kind", "agent", *api_args(cs))
    assert rc == 0, err
    assert out.splitlines()[0].split() == ["SERIAL", "KIND", "SUBJECT", "STATE", "ISSUED",
                                           "EXPIRES", "REVOKED"]
    assert serial in out and "revoked" in out
    rc, out, err = await cli("cert", "revoke", "00:" + "F" * 38, *api_args(cs))
    assert rc == 2 and f"no certificate with serial {'f' * 38!r}" in err, err
    rc, out, err = await cli("cert", "show", serial.upper(), "--json", *api_args(cs))
    assert rc == 0 and json.loads(out) == revoked


async def test_procserver_certificates(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    out = tmp_path / "tls"
    rc, stdout, err = await cli("cert", "procserver", "--name", "ps1", "--host", "127.0.0.1",
                                "--host", "ps1.example", "--out", str(out), "--json",
                                *api_args(cs))
    assert rc == 0, err
    doc = json.loads(stdout)
    assert (out / "server.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["ps1.example"]
    (row,) = await certificates(api, kind="procserver")
    assert row["serial"] == doc["serial"] == format(cert.serial_number, "x")
    assert row["subject"] == "ps1"
    # Refused: a bad host name; nothing issued, nothing written, existing files kept.
    rc, _, err = await cli("cert", "procserver", "--name", "ps2", "--host", "a b", "--out",
                           str(tmp_path / "tls2"), *api_args(cs))
    assert rc == 2 and "hosts/0" in err
    assert not (tmp_path / "tls2").exists()
    rc, _, err = await cli("cert", "procserver", "--name", "ps1", "--host", "127.0.0.1",
                           "--out", str(out), *api_args(cs))
    assert rc == 1 and "refusing to overwrite" in err
    assert len(await certificates(api, kind="procserver")) == 1


# -- enrollment with the passphrase -----------------------------------------------------------

async def test_enroll_with_the_passphrase(cs: ConfigServer, api: ApiClient,
                                          tmp_path: Path) -> None:
    status, body = await enroll(cs, "web01")
    assert (status, body["error"]["code"]) == (404, "machine_not_found")
    assert "siterecovery machine add" in body["error"]["hint"]
    await api.post("/api/v1/machines", {"name": "web01", **MACHINE})
    status, body = await enroll(cs, "web01", "not the passphrase")
    assert (status, body["error"]["code"]) == (401, "wrong_passphrase")
    assert "enrollment-passphrase" in body["error"]["hint"]
    await api.patch("/api/v1/machines/web01", {"enabled": False})
    status, body = await enroll(cs, "web01")
    assert (status, body["error"]["code"]) == (409, "machine_disabled")
    assert await certificates(api, kind="agent") == []  # every refusal issued nothing
    await api.patch("/api/v1/machines/web01", {"enabled": True})

    # The CLI: the passphrase from a file, the site listener verified with the CA file.
    pf = tmp_path / "passphrase"
    pf.write_text(cs.passphrase + "\n")
    out = tmp_path / "agent"
    args = ["mobility", "enroll", "--machine", "web01", "--site", cs.site_url,
            "--passphrase-file", str(pf), "--ca-file", str(cs.ca.cert_path),
            "--server", "127.0.0.1:9443", "--disk", "sda=/dev/sda", "--out", str(out)]
    rc, stdout, err = await cli(*args)
    assert stdout.startswith("enrolled web01")
    assert rc == 0, err
    cfg = tomllib.loads((out / "mobility.toml").read_text())
    assert cfg["machine"] == "web01" and cfg["server_port"] == 9443
    assert (out / "agent.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((out / "agent.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=web01"
    (row,) = await certificates(api, kind="agent")
    assert row["serial"] == format(cert.serial_number, "x") and row["subject"] == "web01"

    # A wrong passphrase through the CLI: a clear refusal, nothing written.
    pf.write_text("wrong\n")
    rc, _, err = await cli(*args[:-1], str(tmp_path / "agent2"))
    assert rc == 1 and "enrollment refused: the enrollment passphrase is wrong" in err, err
    assert not (tmp_path / "agent2").exists()
    # A site listener that does not verify against the CA file is never sent the passphrase.
    other_ca = tmp_path / "other-ca.pem"
    from configserver.ca import CertificateAuthority
    other_ca.write_bytes(CertificateAuthority.load_or_create(tmp_path / "ca2").cert_pem)
    pf.write_text(cs.passphrase)
    rc, _, err = await cli(*[other_ca.as_posix() if a == str(cs.ca.cert_path) else a
                             for a in args[:-1]], str(tmp_path / "agent3"))
    assert rc == 1 and "does not verify against the CA file" in err, err
    assert len(await certificates(api, kind="agent")) == 1


async def test_wrong_passphrases_are_throttled(clocked: tuple[ConfigServer, list[float]]
                                               ) -> None:
    cs, clock = clocked
    async with ApiClient(cs.url, cs.admin_token) as api:
        await api.post("/api/v1/machines", {"name": "web01", **MACHINE})
        for _ in range(5):
            status, body = await enroll(cs, "web01", "guess")
            assert status == 401
        status, body = await enroll(cs, "web01")  # even the right one, for now
        assert (status, body["error"]["code"]) == (429, "too_many_attempts")
        assert "wait 600 seconds" in body["error"]["hint"]
        clock[0] += 300
        status, body = await enroll(cs, "web01")
        assert status == 429 and "wait 300 seconds" in body["error"]["hint"]
        assert await certificates(api, kind="agent") == []
        clock[0] += 301  # ten minutes after the first wrong guess
        status, body = await enroll(cs, "web01")
        assert status == 201 and body["machine"] == "web01"
        async with aiohttp.ClientSession() as http, http.get(f"{cs.url}/metrics") as r:
            text = await r.text()
    counts = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "siterecovery_configserver_enrollments_total"}
    assert counts == {"wrong_passphrase": 5, "throttled": 2, "ok": 1}


async def test_admin_enrollment_adds_this_machine(cs: ConfigServer, api: ApiClient,
                                                  tmp_path: Path) -> None:
    rc, _, err = await cli("mobility", "enroll", "--machine", "local1", *api_args(cs),
                           "--disk", "sda=/dev/sda", "--out", str(tmp_path / "agent"))
    assert rc == 0, err
    m = await api.get("/api/v1/machines/local1")
    assert m["ip"] == "127.0.0.1" and m["os_type"] == "linux" and m["enabled"]
    (row,) = await certificates(api, kind="agent")
    assert row["subject"] == "local1" and row["state"] == "valid"
    # Bad usage first: no machine is added.
    rc, _, err = await cli("mobility", "enroll", "--machine", "local2", *api_args(cs),
                           "--disk", "sda", "--out", str(tmp_path / "agent2"))
    assert rc == 2 and "NAME=PATH" in err
    with pytest.raises(ApiCallError):
        await api.get("/api/v1/machines/local2")


# -- renewal and expiry -------------------------------------------------------------------

def _write_agent(d: Path, issued: dict[str, Any]) -> tuple[str, str]:
    cert, key, _ = write_bundle(d, "agent", Issued(issued["cert"].encode(),
                                                   issued["key"].encode()),
                                issued["ca"].encode())
    return str(cert), str(key)


async def test_renewal_supersedes_the_old_certificate(
        clocked: tuple[ConfigServer, list[float]], tmp_path: Path) -> None:
    cs, clock = clocked
    async with ApiClient(cs.url, cs.admin_token) as api:
        await api.post("/api/v1/machines", {"name": "web01", **MACHINE})
        pf = tmp_path / "passphrase"
        pf.write_text(cs.passphrase)
        out = tmp_path / "agent"
        rc, _, err = await cli("mobility", "enroll", "--machine", "web01", "--site",
                               cs.site_url, "--passphrase-file", str(pf), "--ca-file",
                               str(cs.ca.cert_path), "--disk", "sda=/dev/sda", "--out",
                               str(out))
        assert rc == 0, err
        old = serial_of((out / "agent.pem").read_text())
        shutil.copytree(out, tmp_path / "old")  # the old files, kept aside

        rc, stdout, err = await cli("mobility", "renew", "--config", str(out / "mobility.toml"),
                                    "--site", cs.site_url, "--json")
        assert rc == 0, err
        r = json.loads(stdout)
        cfg = tomllib.loads((out / "mobility.toml").read_text())
        assert cfg["tls_cert"] == r["cert"] and cfg["tls_key"] == r["key"]
        assert not (out / "agent.pem").exists() and not (out / "agent.key").exists()
        assert Path(r["key"]).stat().st_mode & 0o777 == 0o600
        assert serial_of(Path(r["cert"]).read_text()) == r["serial"] != old
        states = {c["serial"]: c["state"] for c in await certificates(api, kind="agent")}
        assert states == {old: "superseded", r["serial"]: "valid"}

        renew = "/api/v1/agent/renew"
        old_ctx = site_ssl(cs, str(tmp_path / "old" / "agent.pem"),
                           str(tmp_path / "old" / "agent.key"))
        status, _ = await site_post(cs, renew, {}, old_ctx)  # within the hour: still works
        assert status == 201
        clock[0] += 3601
        status, body = await site_post(cs, renew, {}, old_ctx)  # an hour later: refused
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        states = {c["serial"]: c["state"] for c in await certificates(api, kind="agent")}
        assert states[old] == "revoked" and states[r["serial"]] == "valid"
        status, _ = await site_post(cs, renew, {}, site_ssl(cs, r["cert"], r["key"]))
        assert status == 201
        # Without a certificate, renewal is refused.
        status, body = await site_post(cs, renew, {}, site_ssl(cs))
        assert (status, body["error"]["code"]) == (401, "unauthorized")


async def test_the_managed_agent_renews_its_certificate_before_it_expires(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    await api.post("/api/v1/machines", {"name": "web01", **MACHINE})
    async with SiteClient(cs.site_url, str(cs.ca.cert_path)) as site:
        cfg_path = await enroll_with_passphrase(
            site, cs.passphrase, tmp_path / "agent", machine="web01",
            server_host="127.0.0.1", server_port=1, disks=[("sda", "/dev/sda")])
    cfg = load(MobilityConfig, cfg_path)
    old = serial_of(Path(cfg.tls_cert).read_text())
    not_after = cert_not_after(cfg.tls_cert)

    async with SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as cp:
        early = ManagedAgent(cfg, cp, config=cfg_path, wall=lambda: not_after - 31 * 86400)
        try:
            await early.renew_if_due()  # 31 days left: nothing to do yet
            assert early.cfg.tls_cert == cfg.tls_cert
        finally:
            early.close()
        managed = ManagedAgent(cfg, cp, config=cfg_path, wall=lambda: not_after - 29 * 86400)
        try:
            await managed.round()  # 29 days left: renewed first, then the settings
            new = managed.cfg.tls_cert
            assert new != cfg.tls_cert and managed.agent.cfg.tls_cert == new
            assert load(MobilityConfig, cfg_path).tls_cert == new  # the file follows
            states = {c["serial"]: c["state"] for c in await certificates(api, kind="agent")}
            assert states == {old: "superseded", serial_of(Path(new).read_text()): "valid"}
            # The control plane authenticates with the new certificate from now on.
            assert (await cp.settings()).item_state is None
            assert (await cp.heartbeat())["machine"] == "web01"
        finally:
            managed.close()


async def test_certificates_expire(clocked: tuple[ConfigServer, list[float]],
                                   tmp_path: Path) -> None:
    cs, clock = clocked
    async with ApiClient(cs.url, cs.admin_token) as api:
        await api.post("/api/v1/machines", {"name": "web01", **MACHINE})
        real = clock[0]
        clock[0] = real - 366 * 86400  # issued a year and a day ago, for 365 days
        status, issued = await enroll(cs, "web01")
        clock[0] = real
        assert status == 201
        (row,) = await certificates(api, kind="agent")
        assert row["state"] == "expired"
        status, trust = await internal_get(cs, "/api/v1/internal/trust")
        assert trust["machines"] == [{"name": "web01", "enabled": True, "serials": [],
                                      "disks": []}]
        cert, key = _write_agent(tmp_path / "agent", issued)
        with pytest.raises(aiohttp.ClientError):  # TLS refuses an expired client certificate
            await site_post(cs, "/api/v1/agent/renew", {}, site_ssl(cs, cert, key))
        assert len(await certificates(api, kind="agent")) == 1  # nothing was issued


# -- the trust list and process servers -----------------------------------------------------

async def internal_get(cs: ConfigServer, path: str, token: str | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            cs.url + path, headers={"Authorization": f"Bearer {token or cs.internal_token}"}
    ) as r:
        return r.status, await r.json()


async def test_trust_list_long_poll(cs: ConfigServer, api: ApiClient) -> None:
    status, _ = await internal_get(cs, "/api/v1/internal/trust", cs.admin_token)
    assert status == 401  # process servers' token only
    await api.post("/api/v1/machines", {"name": "web01", **MACHINE})
    status, issued = await enroll(cs, "web01")
    status, doc = await internal_get(cs, "/api/v1/internal/trust")
    assert status == 200
    assert doc["machines"] == [{"name": "web01", "enabled": True,
                                "serials": [issued["serial"]], "disks": []}]
    assert doc["revoked"] == [] and doc["ca_sha256"] == cs.ca.fingerprint
    # A long poll on the current version answers as soon as the list changes.
    poll = asyncio.create_task(internal_get(
        cs, f"/api/v1/internal/trust?version={doc['version']}&wait=60"))
    await asyncio.sleep(0)  # let the poll start first (order only; the poll waits for change)
    started = time.monotonic()
    await api.post(f"/api/v1/certificates/{issued['serial']}/revoke")
    status, changed = await poll
    assert time.monotonic() - started < 10
    assert changed["version"] != doc["version"]
    assert changed["revoked"] == [issued["serial"]]
    assert changed["machines"] == [{"name": "web01", "enabled": True, "serials": [],
                                    "disks": []}]
    # An unchanged list: the poll answers after `wait` seconds with the same version.
    status, same = await internal_get(
        cs, f"/api/v1/internal/trust?version={changed['version']}&wait=1")
    assert same["version"] == changed["version"]


async def _procserver(cs: ConfigServer, api: ApiClient, tmp_path: Path) -> ProcServerConfig:
    issued = await api.post("/api/v1/certificates/procserver",
                            {"name": "ps1", "hosts": ["127.0.0.1"]})
    tls = tmp_path / "ps-tls"
    cert, key, ca = write_bundle(tls, "server", Issued(issued["cert"].encode(),
                                                       issued["key"].encode()),
                                 issued["ca"].encode())
    url, vault_key = await make_vault(tmp_path)
    return ProcServerConfig(
        data_dir=str(tmp_path / "procserver"), vault_url=url, vault_key_file=str(vault_key),
        tls_cert=str(cert), tls_key=str(key), tls_ca=str(ca), listen_port=0, metrics_port=0,
        configserver_url=cs.url, configserver_token_file=str(cs.cfg.internal_token_path))


async def _agent(cs: ConfigServer, tmp_path: Path, machine: str, port: int,
                 admin: ApiClient | None = None) -> MobilityConfig:
    if admin is not None:
        issued = await admin.post("/api/v1/certificates/agent", {"machine": machine})
    else:
        status, issued = await enroll(cs, machine)
        assert status == 201, issued
    cert, key = _write_agent(tmp_path / f"agent-{machine}", issued)
    disk = tmp_path / f"{machine}.img"
    make_disk(disk, 1 << 20, seed=len(machine))
    return MobilityConfig(machine=machine, server_host="127.0.0.1", server_port=port,
                          tls_ca=str(cs.ca.cert_path), tls_cert=cert, tls_key=key,
                          state_dir=str(tmp_path / f"state-{machine}"),
                          disks=[{"name": "sda", "path": str(disk)}])


async def _cycles(ps: ProcServer) -> int:
    async with ps.sessionmaker() as s:
        return int((await s.execute(select(func.count()).select_from(psdb.Cycle))).scalar_one())


async def _replicate(cfg: MobilityConfig, ps: ProcServer | None = None) -> None:
    """A cycle; with ``ps``, also wait until it is a point (its cache files are gone)."""
    agent = make_agent(cfg)
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    if ps is not None:
        await ps.wait_point(r.cycle)


async def _refused(ps: ProcServer, cfg: MobilityConfig, code: str) -> None:
    before = await _cycles(ps)
    with pytest.raises(RemoteError) as e:
        await _replicate(cfg)
    assert e.value.code == code
    assert await _cycles(ps) == before  # refused at HELLO: nothing was written
    assert not (ps.cache_dir / cfg.machine).exists() or not any(
        (ps.cache_dir / cfg.machine).iterdir())


def _serial(cfg: MobilityConfig) -> str:
    return serial_of(Path(cfg.tls_cert).read_text())


async def test_procserver_refuses_disabled_revoked_and_removed_machines(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    for name in ("web01", "web02", "web03"):
        await api.post("/api/v1/machines", {"name": name, **MACHINE})
    pcfg = await _procserver(cs, api, tmp_path)
    async with running_procserver(pcfg) as ps:
        web01 = await _agent(cs, tmp_path, "web01", ps.port)
        web02 = await _agent(cs, tmp_path, "web02", ps.port)
        web03 = await _agent(cs, tmp_path, "web03", ps.port)
        # The admin route issues for any name; a machine never added is still refused.
        web04 = await _agent(cs, tmp_path, "web04", ps.port, admin=api)
        await _refused(ps, web04, "machine_unknown")
        # Enrolled a moment ago: the process server fetches the newer list and accepts.
        for cfg in (web01, web02, web03):
            await _replicate(cfg, ps)
        assert await _cycles(ps) == 3

        await api.patch("/api/v1/machines/web01", {"enabled": False})
        await api.post(f"/api/v1/certificates/{_serial(web02)}/revoke")
        await api.delete("/api/v1/machines/web03")
        await ps.trust.wait_until(lambda t: not any(
            t.allows(c.machine, _serial(c)) for c in (web01, web02, web03)))
        with structlog.testing.capture_logs() as logs:
            await _refused(ps, web01, "machine_disabled")
            await _refused(ps, web02, "certificate_revoked")
            await _refused(ps, web03, "certificate_revoked")  # removal revoked it
        rejected = [(e["code"], e["machine"]) for e in logs if e["event"] == "session_rejected"]
        assert rejected == [("machine_disabled", "web01"), ("certificate_revoked", "web02"),
                            ("certificate_revoked", "web03")]
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{ps.metrics_port}/metrics") as r:
            text = await r.text()
        refused = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples
                   if s.name == "siterecovery_procserver_rejected_sessions_total"}
        assert {k: refused.get(k) for k in ("machine_disabled", "certificate_revoked",
                                            "machine_unknown")} == \
            {"machine_disabled": 1, "certificate_revoked": 2, "machine_unknown": 1}

        # Enabled again: accepted again. Added again: its old certificate is not inherited.
        await api.patch("/api/v1/machines/web01", {"enabled": True})
        await ps.trust.wait_until(lambda t: t.allows("web01", _serial(web01)))
        await _replicate(web01)
        await api.post("/api/v1/machines", {"name": "web03", **MACHINE})
        await ps.trust.wait_until(lambda t: "web03" in t._machines)
        await _refused(ps, web03, "certificate_revoked")  # not revived by the new machine


async def test_a_machine_may_write_only_its_own_disks(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    await api.post("/api/v1/machines", {"name": "db01", **MACHINE,
                                        "disks": [{"name": "sda", "path": "/dev/sda"}]})
    pcfg = await _procserver(cs, api, tmp_path)
    async with running_procserver(pcfg) as ps:
        own = await _agent(cs, tmp_path, "db01", ps.port)
        extra = tmp_path / "other.img"
        make_disk(extra, 1 << 20, seed=9)
        # A valid certificate of db01, and a disk the inventory does not list for it.
        grabby = dataclasses.replace(own, disks=[*own.disks, {"name": "sdb",
                                                              "path": str(extra)}])
        with structlog.testing.capture_logs() as logs:
            await _refused(ps, grabby, "disk_not_allowed")
        rejected = [e for e in logs if e["event"] == "session_rejected"]
        assert [(e["code"], e["machine"]) for e in rejected] == [("disk_not_allowed", "db01")]
        assert "sdb" in rejected[0]["error"]
        await _replicate(own, ps)  # its own disk: accepted, on the same server
        assert await _cycles(ps) == 1
        # Added to the inventory: the list follows and the disk is accepted.
        await api.patch("/api/v1/machines/db01", {"disks": [
            {"name": "sda", "path": "/dev/sda"}, {"name": "sdb", "path": "/dev/sdb"}]})
        await _replicate(grabby)
        assert await _cycles(ps) == 2


async def test_procserver_keeps_the_last_trust_list_while_the_configserver_is_down(
        tmp_path: Path, catalog_url: str) -> None:
    cs = ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0,
                                         site_port=0, database_url=catalog_url))
    await cs.start()
    try:
        async with ApiClient(cs.url, cs.admin_token) as api:
            for name in ("web01", "web02"):
                await api.post("/api/v1/machines", {"name": name, **MACHINE})
            pcfg = await _procserver(cs, api, tmp_path)
            web01 = await _agent(cs, tmp_path, "web01", 0)
            web02 = await _agent(cs, tmp_path, "web02", 0)
            await api.patch("/api/v1/machines/web02", {"enabled": False})
            async with running_procserver(pcfg) as ps:
                await ps.trust.wait_until(lambda t: t.allows("web01", _serial(web01))
                                          and not t.allows("web02", _serial(web02)))
    finally:
        await cs.stop()
    assert (Path(pcfg.data_dir) / "trust.json").exists()
    # The configuration server is gone; a restarted process server still knows the list.
    with structlog.testing.capture_logs() as logs:
        async with running_procserver(pcfg) as ps:
            await _replicate(MobilityConfig(**{**web01.__dict__, "server_port": ps.port}))
            await _refused(ps, MobilityConfig(**{**web02.__dict__, "server_port": ps.port}),
                           "machine_disabled")
    events = [e["event"] for e in logs]
    assert "trust_refresh_failed" in events
    assert any(e["event"] == "trust_list_updated" and e["source"] == "saved" for e in logs)
