"""Azure Resource Manager for the Azure target: deploy a template, delete what it made,
read a deployed VM's serial log from its boot diagnostics.

Used only when the target has a service principal (``ArmCredentials``); every call
signs in with it anew (``azure.identity``'s client-secret credential, the secret read
from its file when used, never logged). Failures become ``TargetError``s whose code
says which kind (``azure_credentials_rejected``, ``azure_not_authorized``,
``azure_resource_group_missing``, ``azure_unreachable``, or the caller's) and whose
hint says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity.aio import ClientSecretCredential
from azure.mgmt.compute.aio import ComputeManagementClient
from azure.mgmt.network.aio import NetworkManagementClient
from azure.mgmt.resource.deployments.aio import DeploymentsMgmtClient
from azure.mgmt.resource.deployments.models import Deployment, DeploymentProperties
from azure.storage.blob.aio import BlobClient

from targets.armtemplate import DISK, NIC, VM
from targets.base import Recovered, TargetError
from targets.console import clean

CREDENTIALS_HINT = ("set the target's arm table: subscription_id, tenant_id, client_id and "
                    "client_secret_file (a service principal with Contributor on the "
                    "resource group)")
# What a template's resource is called on ``Recovered.resources``.
KINDS = {VM: "azure-vm", NIC: "azure-nic", DISK: "azure-disk"}
DEPLOYMENT = "azure-deployment"
# Deletion order: the VM holds the NIC and the disks; the deployment's record goes last.
DELETE_ORDER = ("azure-vm", "azure-nic", "azure-disk", DEPLOYMENT)
SERIAL_LOG_TAIL = 256 << 10  # bytes of a serial log read: the end is where a boot shows
# Terminal control in a serial log (cursor moves, screen clears), as targets.console drops.


@dataclass(frozen=True)
class ArmCredentials:
    """A service principal allowed to deploy into the target resource group."""

    subscription_id: str
    tenant_id: str
    client_id: str
    client_secret_file: Path  # read when used; never logged

    def __repr__(self) -> str:
        return (f"ArmCredentials(subscription_id={self.subscription_id!r}, "
                f"tenant_id={self.tenant_id!r}, client_id={self.client_id!r}, secret=***)")


def arm_error(e: AzureError, doing: str, *, code: str, hint: str,
              recovered: Recovered | None = None, resource_group: str = "") -> TargetError:
    """``e`` as a ``TargetError``: credentials, permissions, a missing resource group and
    an unreachable service get their own code and hint; anything else ``code``/``hint``."""
    status = getattr(e, "status_code", None)
    error = getattr(e, "error", None)
    service_code = str(getattr(error, "code", "") or "")
    text = f"{doing}: {e.message}"
    if isinstance(e, ClientAuthenticationError) or status == 401:
        return TargetError("azure_credentials_rejected", text,
                           "check tenant_id, client_id and the secret in client_secret_file "
                           "(a secret past its end date is renewed in Entra ID)", recovered)
    if status == 403:
        return TargetError("azure_not_authorized", text,
                           f"give the service principal Contributor on resource group "
                           f"{resource_group or '(the target resource_group)'}, and read "
                           "access to the storage account holding the disks", recovered)
    if service_code == "ResourceGroupNotFound":
        return TargetError("azure_resource_group_missing", text,
                           f"create resource group {resource_group} in the target's "
                           "location (az group create) or set the target's resource_group",
                           recovered)
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        return TargetError("azure_unreachable", text,
                           "check this server's network path to Azure Resource Manager and "
                           "run again", recovered)
    return TargetError(code, text, hint, recovered)


def credential(arm: ArmCredentials) -> ClientSecretCredential:
    """The service principal's credential; raises ``TargetError`` if its secret file
    cannot be read."""
    try:
        secret = arm.client_secret_file.read_text().strip()
    except OSError as e:
        raise TargetError("azure_credentials_unreadable",
                          f"cannot read the client secret file {arm.client_secret_file}: "
                          f"{os.strerror(e.errno or 0)}", CREDENTIALS_HINT) from None
    if not secret:
        raise TargetError("azure_credentials_unreadable",
                          f"the client secret file {arm.client_secret_file} is empty",
                          CREDENTIALS_HINT)
    return ClientSecretCredential(arm.tenant_id, arm.client_id, secret)


def template_refs(template: dict[str, Any]) -> list[str]:
    """``Recovered.resources`` entries for every resource ``template`` makes."""
    return [f"{KINDS[r['type']]}:{r['name']}" for r in template["resources"]]


class Arm:
    """One service principal acting on one resource group."""

    def __init__(self, creds: ArmCredentials, resource_group: str) -> None:
        self.creds, self.resource_group = creds, resource_group

    async def deploy(self, name: str, template: dict[str, Any], recovered: Recovered) -> None:
        """Deploy ``template`` as deployment ``name`` (incremental: what exists is kept,
        so a deployment run again after a failure completes it). Waits for the end."""
        async with credential(self.creds) as cred, \
                DeploymentsMgmtClient(cred, self.creds.subscription_id) as client:
            try:
                poller = await client.deployments.begin_create_or_update(
                    self.resource_group, name,
                    Deployment(properties=DeploymentProperties(mode="Incremental",
                                                               template=template)))
                await poller.result()
            except AzureError as e:
                raise arm_error(e, f"deployment {name} in {self.resource_group}",
                                code="azure_deployment_failed",
                                hint="read the deployment's operations in the resource group "
                                     "(az deployment operation group list), then run the "
                                     "recovery again or clean it up",
                                recovered=recovered, resource_group=self.resource_group) \
                    from None

    async def delete(self, refs: list[str]) -> None:
        """Delete the resources ``refs`` name (``azure-vm:NAME`` …), the VM first. A
        resource already gone is not an error."""
        rg = self.resource_group
        async with credential(self.creds) as cred, \
                ComputeManagementClient(cred, self.creds.subscription_id) as compute, \
                NetworkManagementClient(cred, self.creds.subscription_id) as network, \
                DeploymentsMgmtClient(cred, self.creds.subscription_id) as deployments:
            for kind in DELETE_ORDER:
                for ref in refs:
                    k, _, name = ref.partition(":")
                    if k != kind:
                        continue
                    try:
                        if kind == "azure-vm":
                            poller: Any = await compute.virtual_machines.begin_delete(rg, name)
                        elif kind == "azure-nic":
                            poller = await network.network_interfaces.begin_delete(rg, name)
                        elif kind == "azure-disk":
                            poller = await compute.disks.begin_delete(rg, name)
                        else:
                            poller = await deployments.deployments.begin_delete(rg, name)
                        await poller.result()
                    except ResourceNotFoundError:
                        pass
                    except AzureError as e:
                        raise arm_error(e, f"cannot delete {ref}", code="azure_cleanup_failed",
                                        hint="run the cleanup again", resource_group=rg) \
                            from None

    async def serial_log(self, vm: str) -> list[str]:
        """The last lines of ``vm``'s serial log (boot diagnostics), control sequences
        dropped; empty while Azure has none yet."""
        async with credential(self.creds) as cred, \
                ComputeManagementClient(cred, self.creds.subscription_id) as compute:
            try:
                found = await compute.virtual_machines.retrieve_boot_diagnostics_data(
                    self.resource_group, vm, sas_uri_expiration_time_in_minutes=5)
            except ResourceNotFoundError:
                return []
            except AzureError as e:
                raise arm_error(e, f"cannot read the boot diagnostics of {vm}",
                                code="azure_boot_diagnostics_failed",
                                hint="the VM's boot diagnostics must be on (the template "
                                     "turns them on); run the recovery again",
                                resource_group=self.resource_group) from None
        uri = found.serial_console_log_blob_uri
        if not uri:
            return []
        # The URI carries its own short-lived SAS: no other credential.
        async with BlobClient.from_blob_url(uri) as blob:
            try:
                size = (await blob.get_blob_properties()).size
                offset = max(0, int(size) - SERIAL_LOG_TAIL)
                stream = await blob.download_blob(offset=offset) if size else None
                data = await stream.readall() if stream is not None else b""
            except ResourceNotFoundError:
                return []
            except HttpResponseError as e:
                raise arm_error(e, f"cannot read the serial log of {vm}",
                                code="azure_boot_diagnostics_failed", hint="run the boot again",
                                resource_group=self.resource_group) from None
        text = clean(bytes(data))
        return [ln.rstrip() for ln in text.split("\n") if ln.strip()]
