"""The agent's client of the site listener, against a real configuration server."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from configserver.server import ConfigServer
from mobility.reporter import ProgressReporter
from mobility.siteclient import SiteClient, SiteRefused, SiteTLSFilesError, SiteUnreachable
from siterecovery.apiclient import ApiClient
from tests.helpers import run_cli
from tests.sitehelpers import AgentSite, add_machine, add_procserver, step_running, wait_job


async def _enrolled(cs: ConfigServer, tmp_path: Path, name: str) -> SiteClient:
    site = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, name, cs.passphrase,
                                  tmp_path / "agent")
    assert site.cert is not None and site.key is not None
    return SiteClient(cs.site_url, str(cs.ca.cert_path), str(site.cert), str(site.key))


async def test_settings_heartbeat_and_progress(cs: ConfigServer, api: ApiClient,
                                               tmp_path: Path) -> None:
    await add_machine(api, "web01")
    await add_procserver(cs.url, cs.internal_token, "ps1", "127.0.0.1:9443")
    async with await _enrolled(cs, tmp_path, "web01") as control:
        s = await control.settings()
        assert not s.replicate and s.item_state is None
        assert [d["name"] for d in s.disks] == ["sda", "sdb"]
        job = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]
        await wait_job(api, job["id"], step_running("prepare_agent"))  # a server assigned
        s = await control.settings()
        assert s.replicate and s.process_server == "127.0.0.1:9443"
        policy = await api.get("/api/v1/policies/default")
        assert s.crash_interval_seconds == policy["crash_consistent_interval_seconds"]
        assert s.block_size == policy["block_size"]
        hb = await control.heartbeat()
        assert hb["machine"] == "web01"
        # the check-in ends the job's wait for the agent; the item is then in initial
        # replication (a report before that counts as the same progress, still "enabling")
        await wait_job(api, job["id"], step_running("initial_replication"))
        async with ProgressReporter(control, ["sda", "sdb"], resync=False, every=3600) as rep:
            rep("sda", 1, 4)
        item = await api.get("/api/v1/items/web01")
        assert item["state"] == "initial_replication"
        assert item["initial_progress"] == pytest.approx(100.0)


async def test_refusals_are_site_errors(cs: ConfigServer, api: ApiClient,
                                           tmp_path: Path) -> None:
    await add_machine(api, "db01")
    async with await _enrolled(cs, tmp_path, "db01") as control:
        with pytest.raises(SiteRefused, match="not_replicated") as e:
            await control.progress({"sda": 10.0})
        assert e.value.code == "not_replicated"
        await api.patch("/api/v1/machines/db01", {"enabled": False})
        with pytest.raises(SiteRefused, match="401") as e:
            await control.settings()
        assert e.value.status == 401


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A local port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


async def test_an_unreachable_listener_is_site_unreachable(cs: ConfigServer,
                                                           refusing_port: int) -> None:
    async with SiteClient(f"https://127.0.0.1:{refusing_port}", str(cs.ca.cert_path)) as site:
        with pytest.raises(SiteUnreachable) as e:
            await site.settings()
    assert isinstance(e.value.cause, OSError)
    assert str(e.value).startswith("GET /api/v1/agent/settings: ClientConnectorError")



async def test_a_listener_that_never_answers_is_given_up_at_the_clients_timeout(
        cs: ConfigServer) -> None:
    """A socket that accepts and says nothing (a hung server): a call ends at the
    client's timeout (a call with a timeout of its own, the long poll, at that one)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        async with SiteClient(url, str(cs.ca.cert_path), timeout=0.5) as site:
            with pytest.raises(SiteUnreachable) as e:
                await site.settings()
            assert isinstance(e.value.cause, TimeoutError)

def test_tls_files_that_do_not_load_are_named(tmp_path: Path) -> None:
    with pytest.raises(SiteTLSFilesError, match=r"cannot load the TLS files \(.*/nosuch.pem\)"):
        SiteClient("https://127.0.0.1:9441", str(tmp_path / "nosuch.pem"))


def test_enrolling_with_an_unreachable_listener_says_so(cs: ConfigServer, tmp_path: Path,
                                                        refusing_port: int) -> None:
    pf = tmp_path / "passphrase"
    pf.write_text(cs.passphrase)
    site = f"https://127.0.0.1:{refusing_port}"
    r = run_cli("mobility", "enroll", "--machine", "web01", "--site", site,
                "--passphrase-file", str(pf), "--ca-file", str(cs.ca.cert_path),
                "--disk", "sda=/dev/sda", "--out", str(tmp_path / "agent"))
    assert r.returncode == 1, r.stderr
    assert f"error: enrollment: cannot reach the configuration server at {site}: " in r.stderr
    assert "hint: --site is its site listener, https://HOST:9441" in r.stderr
    assert not (tmp_path / "agent").exists()
