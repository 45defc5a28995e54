"""The configuration server through its real HTTP API."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.tomlconfig import ConfigError, from_mapping


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


POINT: dict[str, object] = {
    "id": "a" * 64, "machine": "web01", "created": "2026-11-25T10:00:00.000000Z",
         "consistency": "crash", "cycle": "c1", "base": None, "chain": 0, "disks": []}


async def test_points_are_reported_with_the_internal_token_only(cs: ConfigServer) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{cs.url}/api/v1/internal/points"
        async with http.post(url, json=POINT, headers=_auth(cs.admin_token)) as r:
            assert r.status == 401  # the admin token is not the process servers' token
        async with http.post(url, json={"id": 1}, headers=_auth(cs.internal_token)) as r:
            assert r.status == 422
            assert (await r.json())["error"]["code"] == "invalid_request"
        for _ in range(2):  # reporting twice is idempotent
            async with http.post(url, json=POINT, headers=_auth(cs.internal_token)) as r:
                assert r.status == 201
        async with http.get(f"{cs.url}/api/v1/points?machine=web01",
                            headers=_auth(cs.admin_token)) as r:
            points = (await r.json())["points"]
        assert [p["id"] for p in points] == ["a" * 64]
        async with http.get(f"{cs.url}/api/v1/points?machine=other",
                            headers=_auth(cs.admin_token)) as r:
            assert (await r.json())["points"] == []


async def test_agent_certificates(cs: ConfigServer) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{cs.url}/api/v1/certificates/agent"
        async with http.post(url, json={"machine": "../etc"}, headers=_auth(cs.admin_token)) as r:
            assert r.status == 422
            assert "does not match" in (await r.json())["error"]["message"]
        async with http.post(url, json={"machine": "web01"}) as r:
            assert r.status == 401
        async with http.post(url, json={"machine": "web01"}, headers=_auth(cs.admin_token)) as r:
            assert r.status == 201
            body = await r.json()
    cert = x509.load_pem_x509_certificate(body["cert"].encode())
    ca = x509.load_pem_x509_certificate(body["ca"].encode())
    assert cert.subject.rfc4514_string() == "CN=web01"
    cert.verify_directly_issued_by(ca)


async def test_tokens_survive_restart(tmp_path: Path) -> None:
    cfg = ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0)
    a = ConfigServer(cfg)
    await a.start()
    token = a.admin_token
    await a.stop()
    b = ConfigServer(cfg)
    await b.start()
    try:
        assert b.admin_token == token
        assert cfg.token_path.stat().st_mode & 0o777 == 0o600
    finally:
        await b.stop()


def test_admin_api_refuses_non_loopback() -> None:
    with pytest.raises(ConfigError, match="loopback only"):
        from_mapping(ConfigServerConfig, {"data_dir": "/x", "listen_host": "0.0.0.0"}, "t.toml")
