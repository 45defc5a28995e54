"""The Azure target's Resource Manager path: deployment, boot proof from boot diagnostics,
deletion.

Offline (always): what a submission names for cleanup before it starts, errors with
their codes and hints, no boot claimed without a deployment. Against real Azure only when
``SITERECOVERY_TEST_AZURE_TARGET`` names a TOML file (never in CI: no network there, and
no subscription): the target's URL (``url = "azure://CONTAINER?connection_string_file=…"``)
and an ``[azure_target]`` table as in the configuration server's file, with its ``arm``
table. That test exists only then, so CI never sees it skipped.
"""

from __future__ import annotations

import os
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
)
from azure.storage.blob.aio import ContainerClient

from targets.azure import AzureSettings, AzureTarget
from targets.azurearm import ArmCredentials, arm_error
from targets.base import Recovered, RecoveryDisk, RecoverySpec, TargetError
from tests.bootdisk import bootdisk, missing_tools
from tests.test_target_azure import ACCOUNT_ID, _disks

REAL = os.environ.get("SITERECOVERY_TEST_AZURE_TARGET", "")
KERNEL_BANNER = "Linux version"


@pytest.fixture
async def container(azurite_conn: str) -> AsyncIterator[ContainerClient]:
    c = ContainerClient.from_connection_string(azurite_conn, "t" + uuid.uuid4().hex[:20],
                                               retry_total=0)
    await c.create_container()
    try:
        yield c
    finally:
        await c.close()


def _settings(arm: ArmCredentials | None) -> AzureSettings:
    return AzureSettings(location="westeurope", resource_group="dr",
                         storage_account_id=ACCOUNT_ID, network="prod/apps",
                         drill_network="drill/iso", vm_size="Standard_B2s", arm=arm)


async def test_a_submission_names_everything_before_it_starts(
        tmp_path: Path, container: ContainerClient) -> None:
    missing = tmp_path / "no-such-secret"
    arm = ArmCredentials("sub", "tenant", "client", missing)
    target = AzureTarget(container, _settings(arm))
    with pytest.raises(TargetError) as info:
        await target.create(RecoverySpec(machine="m", vm_name="web1"), _disks(tmp_path))
    err = info.value
    assert err.code == "azure_credentials_unreadable" and str(missing) in err.message
    assert "client_secret_file" in err.hint
    assert err.recovered is not None
    # The blobs, then every resource the template makes and the deployment's record:
    # cleanup finds all of them even though the deployment never started.
    arm_refs = [r for r in err.recovered.resources if not r.startswith("blob:")]
    assert arm_refs == ["azure-disk:web1-sda", "azure-disk:web1-sdb", "azure-nic:web1-nic",
                        "azure-vm:web1", "azure-deployment:siterecovery-web1"]
    assert "deployed_at" not in err.recovered.details
    assert await target.boot(err.recovered, 1.0) is None  # nothing deployed: no proof

    # Cleanup without credentials removes the blobs and names what it could not delete.
    bare = AzureTarget(container, _settings(None))
    with pytest.raises(TargetError) as info:
        await bare.cleanup(err.recovered)
    assert info.value.code == "azure_credentials_missing"
    assert "azure-vm:web1" in info.value.message
    assert "azure-deployment:siterecovery-web1" in info.value.message
    assert [b async for b in container.list_blobs()] == []

    empty = tmp_path / "empty-secret"
    empty.write_text("\n")
    with pytest.raises(TargetError, match="is empty") as info:
        await AzureTarget(container, _settings(ArmCredentials("s", "t", "c", empty))).cleanup(
            err.recovered)
    assert info.value.code == "azure_credentials_unreadable"


def _http_error(status: int, code: str = "") -> HttpResponseError:
    e = HttpResponseError(message=f"({code or status}) refused")
    e.status_code = status
    if code:
        e.error = type("E", (), {"code": code})()  # the service's error body
    return e


def test_arm_errors_say_what_failed_and_what_to_do() -> None:
    def mapped(e: Any) -> TargetError:
        return arm_error(e, "deployment x in dr", code="azure_deployment_failed",
                         hint="read the deployment's operations", resource_group="dr")

    got = mapped(ClientAuthenticationError(message="AADSTS7000215: invalid client secret"))
    assert got.code == "azure_credentials_rejected" and "client_secret_file" in got.hint
    assert "AADSTS7000215" in got.message and got.message.startswith("deployment x in dr: ")
    got = mapped(_http_error(403, "AuthorizationFailed"))
    assert got.code == "azure_not_authorized" and "Contributor on resource group dr" in got.hint
    got = mapped(_http_error(404, "ResourceGroupNotFound"))
    assert got.code == "azure_resource_group_missing" and "create resource group dr" in got.hint
    got = mapped(ServiceRequestError("connection refused"))
    assert got.code == "azure_unreachable" and "run again" in got.hint
    got = mapped(_http_error(400, "InvalidTemplateDeployment"))
    assert (got.code, got.hint) == ("azure_deployment_failed",
                                    "read the deployment's operations")
    assert "InvalidTemplateDeployment" in got.message


if REAL:
    async def test_real_azure_deploys_boots_and_cleans_up(tmp_path: Path) -> None:
        if missing_tools():
            pytest.fail(f"the boot disk needs {', '.join(missing_tools())}")
        conf = tomllib.loads(Path(REAL).read_text())
        target = AzureTarget.open(conf["url"], AzureSettings.from_mapping(conf["azure_target"]))
        disk = tmp_path / "sda.img"
        disk.write_bytes(bootdisk().read_bytes())
        with open(disk, "r+b") as f:  # a disk of a size Azure surely imports; zeros: sparse
            f.truncate(1 << 30)
        name = f"sr-test-{uuid.uuid4().hex[:8]}"
        # The boot disk's init looks for a virtio disk, which Azure has not: the proof is
        # the kernel's first line on the serial console (console=ttyS0), which shows the
        # page blob became a managed disk that Azure booted with its boot loader.
        spec = RecoverySpec(machine="drill-source", vm_name=name, drill=True,
                            boot_marker=KERNEL_BANNER)
        rec: Recovered | None = None
        try:
            try:
                rec = await target.create(spec, [RecoveryDisk("sda", disk,
                                                              disk.stat().st_size)])
            except TargetError as e:
                rec = e.recovered
                raise
            assert rec.details["deployment"] == f"siterecovery-{name}"
            assert "uefi" not in rec.details["firmware"]  # an MBR disk: Generation 1
            proof = await target.boot(rec, 900.0)
            assert proof is not None and KERNEL_BANNER in proof.matched
        finally:
            if rec is not None:
                await target.cleanup(rec)
                await target.cleanup(rec)  # idempotent: everything is gone already
            await target.close()
