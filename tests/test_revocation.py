"""Revoked server certificates (#12 item 4), every part real: a process server whose
certificate is revoked through the API is refused by the agent (which learns revoked
server certificates from its settings) and itself refuses every session until it runs
with a new certificate; then replication works again."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import pytest

from configserver import db
from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from mobility.agent import Agent
from mobility.daemon import ManagedAgent
from mobility.siteclient import SiteCertificateRevoked
from siterecovery.apiclient import ApiClient
from tests.helpers import mutate
from tests.managedsite import issue_procserver_cert, managed_site
from wire.protocol import ProtocolError, RemoteError


async def test_revoked_procserver_certificate(cs: ConfigServer, api: ApiClient,
                                              tmp_path: Path) -> None:
    async with managed_site(cs, api, tmp_path) as site:
        managed = site.managed
        assert await managed.round()  # the initial copy, through ps1
        assert managed.last is not None
        await site.ps.wait_point(managed.last.cycle)
        old = site.ps_cert.serial
        assert managed.agent.revocation_list is None

        revoked = await api.post(f"/api/v1/certificates/{old}/revoke")
        assert revoked["state"] == "revoked"

        # The process server learns it from its trust list and refuses every session.
        await site.ps.trust.wait_until(lambda t: t.own_revoked)
        # The agent learns it from its settings (a CRL from the CA) and its handshake
        # refuses the process server: nothing is sent.
        s = await managed.refresh()
        assert s is not None and old in s.revoked_servers
        assert s.revocation_list is not None and managed.agent.revocation_list is not None
        assert Path(managed.agent.revocation_list).read_text() == s.revocation_list
        assert managed.site.revocation_list == managed.agent.revocation_list
        restarted = ManagedAgent(site.cfg, managed.site)  # kept in state_dir: a restart
        try:  # refuses the process server before it has any settings
            assert restarted.agent.revocation_list == managed.agent.revocation_list
        finally:
            restarted.close()
        mutate(site.disk, 0.05, seed=7)
        with pytest.raises(ProtocolError) as e:
            await managed.round()
        assert e.value.code == "server_certificate_revoked"
        # An agent that has not heard of it yet is refused by the process server itself.
        unaware = Agent(managed.agent.cfg, provider=managed.crash)
        try:
            with pytest.raises(RemoteError) as r:
                await unaware.replicate_once()
        finally:
            unaware.close()
        assert r.value.code == "server_certificate_revoked"

        # A new certificate, installed in the same files (no restart): accepted again.
        new = await issue_procserver_cert(api, Path(site.pcfg.tls_cert).parent)
        assert await managed.round()
        assert not site.ps.trust.own_revoked
        assert managed.last is not None and managed.last.kind == "delta"
        await site.ps.wait_point(managed.last.cycle)
        assert new.serial != old and managed.agent.revocation_list is not None



async def served_serial(cs: ConfigServer) -> str:
    """The serial of the certificate the site listener serves now."""
    ctx = ssl.create_default_context(cafile=str(cs.ca.cert_path))
    _, writer = await asyncio.open_connection("127.0.0.1", cs.site_port, ssl=ctx,
                                              server_hostname="127.0.0.1")
    try:
        return str(writer.get_extra_info("peercert")["serialNumber"]).lower().lstrip("0")
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def site_certificate(cs: ConfigServer, api: ApiClient) -> str:
    """The serial of the site listener's certificate in the catalog (recorded at start)."""
    async with asyncio.timeout(30), cs.changed:
        while not (rows := (await api.get("/api/v1/certificates", kind="configserver",
                                          state="valid"))["certificates"]):
            await cs.changed.wait()
    return str(rows[-1]["serial"])


async def test_revoked_site_listener_certificate_is_replaced(
        cs: ConfigServer, api: ApiClient, tmp_path: Path) -> None:
    async with managed_site(cs, api, tmp_path) as site:
        old = await site_certificate(cs, api)
        assert await served_serial(cs) == old
        assert (await site.managed.refresh()) is not None

        await api.post(f"/api/v1/certificates/{old}/revoke")
        # Served from the next connection on: a new certificate, not revoked.
        new = await served_serial(cs)
        assert new != old
        assert (await api.get(f"/api/v1/certificates/{new}"))["state"] == "valid"
        # The agent learns the old one is revoked, and goes on with the new one.
        s = await site.managed.refresh()
        assert s is not None and old in s.revoked_servers and new not in s.revoked_servers
        assert site.managed.site.revocation_list is not None
        assert Path(site.managed.site.revocation_list).read_text() == s.revocation_list
        assert await site.managed.round()

        # A listener serving a revoked certificate (revoked behind its back, say by
        # another configuration server on the same catalog): the agent's handshake
        # refuses it once its settings carry the new list.
        async with cs.sessionmaker() as db_session:
            row = await db_session.get_one(db.Certificate, new)
            row.revoked_at = cs.clock()
            await db_session.commit()
        s = await site.managed.refresh()
        assert s is not None and new in s.revoked_servers
        with pytest.raises(SiteCertificateRevoked) as e:
            await site.managed.site.heartbeat()
        assert "revoked" in str(e.value)


async def test_site_listener_never_starts_with_a_revoked_certificate(
        tmp_path: Path, catalog_url: str) -> None:
    cfg = ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0,
                             database_url=catalog_url)
    first = ConfigServer(cfg)
    await first.start()
    try:
        async with ApiClient(first.url, first.admin_token) as api:
            old = await site_certificate(first, api)
        # Revoked behind the listener's back (say, by another configuration server on the
        # same catalog): the next start replaces it before listening.
        async with first.sessionmaker() as s:
            row = await s.get_one(db.Certificate, old)
            row.revoked_at = first.clock()
            await s.commit()
    finally:
        await first.stop()
    second = ConfigServer(cfg)
    await second.start()
    try:
        new = await served_serial(second)
        assert new != old
        async with ApiClient(second.url, second.admin_token) as api:
            assert (await api.get(f"/api/v1/certificates/{new}"))["state"] == "valid"
            assert (await api.get(f"/api/v1/certificates/{old}"))["state"] == "revoked"
    finally:
        await second.stop()
