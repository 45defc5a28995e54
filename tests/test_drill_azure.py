"""A drill on the Azure target through the real configuration server (SQLite and
PostgreSQL), a real vault and Azurite: the target comes from the server's configuration,
the item's azure_size and drill network reach the template, the restored disk's EFI
system partition makes a Generation 2 machine, cleanup removes every blob, settings Azure
refuses fail the drill at the target's check with nothing uploaded, and the boot step
gets the server's failover_boot_timeout_seconds."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob.aio import ContainerClient

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient
from targets.armtemplate import DISK, NIC, VM
from targets.armtemplate import unknown_properties as template_problems
from targets.base import BootProof, Recovered
from tests import bootimages
from tests.helpers import make_vault, open_vault, write_full_point
from tests.sitehelpers import (
    AgentSite,
    add_machine,
    add_procserver,
    next_job,
    report_point,
    step,
    wait_job,
)
from tests.test_target_azure import ACCOUNT_ID
from vault.regkey import make_key

BOOT_TIMEOUT = 45.0  # the server's failover_boot_timeout_seconds, which boot() is given


@pytest.fixture
async def azure_cs(tmp_path: Path, catalog_url: str, azurite_conn: str
                   ) -> AsyncIterator[tuple[ConfigServer, ContainerClient]]:
    bootimages.need_tools()
    conn = tmp_path / "azure.conn"
    conn.write_text(azurite_conn)
    name = "dr" + uuid.uuid4().hex[:16]
    server = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp_path / "cs"), listen_port=0, site_port=0, database_url=catalog_url,
        failover_boot_timeout_seconds=BOOT_TIMEOUT,
        azure_target_url=f"azure://{name}/recovered?connection_string_file={conn}",
        azure_target={"location": "westeurope", "resource_group": "dr",
                      "storage_account_id": ACCOUNT_ID, "network": "prod-vnet/apps",
                      "drill_network": "drill-vnet/isolated"}))
    await server.start()
    container = ContainerClient.from_connection_string(azurite_conn, name, retry_total=0)
    try:
        yield server, container
    finally:
        await container.close()
        await server.stop()


async def _protected(cs: ConfigServer, api: ApiClient, tmp: Path, disk: bytes) -> str:
    """web01 protected through the real jobs with one point of ``disk``; its id."""
    url, key = await make_vault(tmp)
    vault = await open_vault(tmp / "vault", key)
    try:
        await api.post("/api/v1/registration", {
            "key": json.dumps(make_key(vault, url, time.time())), "vault_key_file": str(key)})
        await add_procserver(cs.url, cs.internal_token)
        await add_machine(api, "web01", disks=("sda",))
        agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01", cs.passphrase,
                                       tmp / "agent")
        jid = (await api.post("/api/v1/replication/enable", {"machine": "web01"}))["job"]["id"]
        async with agent:
            assert (await agent.heartbeat("2.0.0"))[0] == 200
            assert (await agent.progress({"sda": 100}))[0] == 200
        point = await write_full_point(vault, disk, machine="web01", cycle="c0")
        await report_point(cs.url, cs.internal_token, "web01", point.id, point.created,
                           point.consistency)
    finally:
        await vault.close()
    assert (await wait_job(api, jid))["state"] == "succeeded"
    fin = await wait_job(api, (await next_job(api, "web01", "finalize_protection"))["id"])
    assert fin["state"] == "succeeded"
    return point.id


async def _blobs(c: ContainerClient) -> list[str]:
    return sorted([b.name async for b in c.list_blobs()])


async def _run(api: ApiClient, verb: str, body: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    job = (await api.post(f"/api/v1/items/web01/{verb}", body or {}))["job"]
    done: dict[str, Any] = await wait_job(api, job["id"], timeout=120)
    return done


async def test_a_drill_on_azure_then_cleanup(
        azure_cs: tuple[ConfigServer, ContainerClient], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cs, container = azure_cs
    target = cs._targets["azure"]  # the server's own target, watched: the real boot runs
    timeouts: list[float] = []
    real_boot = target.boot

    async def boot(recovered: Recovered, timeout: float) -> BootProof | None:
        timeouts.append(timeout)
        return await real_boot(recovered, timeout)

    monkeypatch.setattr(target, "boot", boot)
    image = bootimages.gpt(tmp_path / "uefi.img", bios_boot=False, esp=True)
    async with ApiClient(cs.url, cs.admin_token) as api:
        pid = await _protected(cs, api, tmp_path, image.read_bytes())
        await api.call("PATCH", "/api/v1/items/web01/recovery", {
            "target": "azure", "azure_size": "Standard_D2s_v5", "drill_network": "iso2",
            "ip": "10.1.0.9"}, {})
        job = await _run(api, "test-failover")
        assert job["state"] == "succeeded", job
        assert pid in step(job, "select_point")["message"]
        assert "cannot boot machines" in step(job, "boot")["message"]
        assert timeouts == [BOOT_TIMEOUT]  # from the configuration, not the default
        item = await api.get("/api/v1/items/web01")
        rec = item["last_drill"]["recovered"]
        assert rec["details"]["vm_size"] == "Standard_D2s_v5"
        assert rec["details"]["firmware"].startswith("uefi: the disk boots with uefi only")
        assert sorted(rec["resources"]) == [
            f"blob:{container.container_name}/recovered/web01/sda.vhd",
            f"blob:{container.container_name}/recovered/web01/template.json"]
        assert await _blobs(container) == ["recovered/web01/sda.vhd",
                                           "recovered/web01/template.json"]
        stream = await container.get_blob_client("recovered/web01/template.json").download_blob()
        t = json.loads(await stream.readall())
        assert template_problems(t) == []
        by_type = {r["type"]: r for r in t["resources"]}
        assert by_type[DISK]["properties"]["hyperVGeneration"] == "V2"
        assert by_type[VM]["properties"]["hardwareProfile"]["vmSize"] == "Standard_D2s_v5"
        ipc = by_type[NIC]["properties"]["ipConfigurations"][0]["properties"]
        assert ipc["subnet"]["id"].endswith("'drill-vnet', 'iso2')]")  # the item's subnet
        assert ipc["privateIPAddress"] == "10.1.0.9"

        done = await _run(api, "cleanup-test-failover", {"notes": "azure drill"})
        assert done["state"] == "succeeded", done
        assert await _blobs(container) == []
        assert (await api.get("/api/v1/items/web01"))["state"] == "protected"

        # settings Azure refuses (no offered size has 32 CPUs; an IPv6 address): the drill
        # fails at the target's check, before a disk is restored or a blob written, each
        # refusal naming the setting and what is allowed, and the item is protected again
        await api.call("PATCH", "/api/v1/items/web01/recovery", {
            "azure_size": None, "cpus": 32, "ip": "2001:db8::9"}, {})
        job = await _run(api, "test-failover")
        assert job["state"] == "failed" and step(job, "select_point")["state"] == "failed", job
        assert step(job, "restore")["state"] != "succeeded"
        assert "the target refuses the recovery: " in job["error"]
        assert "azure_size: no offered size has 32 CPUs" in job["error"]
        assert "set azure_size to one of Standard_B1s, " in job["error"]
        assert "ip: ip '2001:db8::9' is not allowed: a private IPv4 address" in job["error"]
        assert await _blobs(container) == []
        item = await api.get("/api/v1/items/web01")
        assert (item["state"], item["last_drill"]["result"]) == ("protected", "failed")
        assert item["last_drill"].get("work") is None
        assert not (Path(cs.cfg.data_dir) / "failover-work" / job["id"]).exists()
