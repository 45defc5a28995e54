"""The ARM deployment template of a recovered Azure VM, built from the Azure SDK's models.

Every resource body is an ``azure.mgmt.compute.models`` / ``azure.mgmt.network.models``
object serialized by the SDK itself (``as_dict(exclude_readonly=True)``, what the SDK
sends on a create), so property names and nesting are the service's; each resource's
``apiVersion`` is the one the same SDK sends for that resource type. The template:

- one ``Microsoft.Compute/disks`` per disk, imported (``createOption: Import``) from its
  fixed-VHD page blob (``sourceUri``) in the storage account ``storageAccountId``, with
  the OS type and the Hyper-V generation (V1: BIOS, V2: UEFI);
- one ``Microsoft.Network/networkInterfaces`` in the chosen subnet, with the static
  private IP or a dynamic one;
- the ``Microsoft.Compute/virtualMachines`` of the chosen size, attaching those disks
  (the OS disk, then data disks at LUN 0, 1, …) and that NIC, boot diagnostics on
  (the serial log and a screenshot: in managed storage, or in the storage account
  whose blob endpoint ``boot_diagnostics_uri`` names).

``unknown_properties`` reads a template back through the same models and names every
property they do not know or that is read-only: the check before a submission, and
the test's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

from azure.mgmt.compute import models as cm
from azure.mgmt.compute.operations import _operations as compute_ops
from azure.mgmt.network import models as nm
from azure.mgmt.network.operations import _operations as network_ops

SCHEMA = "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#"
VM = "Microsoft.Compute/virtualMachines"
DISK = "Microsoft.Compute/disks"
NIC = "Microsoft.Network/networkInterfaces"
SUBNET = "Microsoft.Network/virtualNetworks/subnets"

# The model class of each resource type, for building and for reading back.
MODELS: dict[str, type[Any]] = {VM: cm.VirtualMachine, DISK: cm.Disk,
                                NIC: nm.NetworkInterface}


def _builder_version(build: Callable[..., Any], *args: str) -> str:
    # The SDK pins one api-version per operation in its request builders (no public
    # accessor exists): ask the create request it would send for the version it uses.
    request = build(*args)
    return str(parse_qs(urlparse(request.url).query)["api-version"][0])


def api_versions() -> dict[str, str]:
    """The api-version the installed SDK uses to create each resource type."""
    return {
        VM: _builder_version(compute_ops.build_virtual_machines_create_or_update_request,
                             "rg", "vm", "sub"),
        DISK: _builder_version(compute_ops.build_disks_create_or_update_request,
                               "rg", "disk", "sub"),
        NIC: _builder_version(network_ops.build_network_interfaces_create_or_update_request,
                              "rg", "nic", "sub"),
    }


@dataclass(frozen=True)
class DiskPlan:
    name: str  # the managed disk's resource name
    source_uri: str  # the fixed-VHD page blob it is imported from


@dataclass(frozen=True)
class VmPlan:
    """Everything the template says, already checked (``targets.azurecheck``)."""

    vm_name: str
    location: str
    vm_size: str
    generation: str  # "V1" (BIOS) or "V2" (UEFI)
    storage_account_id: str  # the account holding the page blobs
    subnet_id: str  # a subnet resource id, or an ARM expression giving one
    ip: str | None  # static private IP; None: dynamic
    os_disk: DiskPlan
    data_disks: list[DiskPlan] = field(default_factory=list)
    disk_sku: str = "Standard_LRS"
    tags: dict[str, str] = field(default_factory=dict)
    boot_diagnostics_uri: str | None = None  # None: managed boot diagnostics storage

    @property
    def nic_name(self) -> str:
        return f"{self.vm_name}-nic"


def subnet_id(network: str) -> str:
    """``VNET/SUBNET`` (in the deployment's resource group) or a full subnet resource id,
    as the template's subnet id. Raises ``ValueError`` for anything else."""
    if network.startswith("/subscriptions/"):
        parts = [p.lower() for p in network.strip("/").split("/")]
        if len(parts) != 10 or [parts[i] for i in (2, 4, 5, 6, 8)] != [
                "resourcegroups", "providers", "microsoft.network", "virtualnetworks",
                "subnets"]:
            raise ValueError(f"{network!r} is not a subnet resource id")
        return network
    vnet, sep, subnet = network.partition("/")
    if not sep or not vnet or not subnet or "/" in subnet or "'" in network:
        raise ValueError(f"network {network!r}: give VNET/SUBNET or a subnet resource id")
    return f"[resourceId('{SUBNET}', '{vnet}', '{subnet}')]"


def _rid(kind: str, name: str) -> str:
    return f"[resourceId('{kind}', '{name}')]"


def _body(model: Any) -> dict[str, Any]:
    # The SDK's own wire form of a create request (read-only properties dropped).
    body: dict[str, Any] = model.as_dict(exclude_readonly=True)
    return body


def _disk(plan: VmPlan, d: DiskPlan) -> dict[str, Any]:
    model = cm.Disk(
        location=plan.location,
        tags=plan.tags or None,
        sku=cm.DiskSku(name=plan.disk_sku),
        properties=cm.DiskProperties(
            os_type="Linux" if d is plan.os_disk else None,
            hyper_v_generation=plan.generation if d is plan.os_disk else None,
            creation_data=cm.CreationData(create_option="Import", source_uri=d.source_uri,
                                          storage_account_id=plan.storage_account_id),
        ),
    )
    return {"type": DISK, "name": d.name, **_body(model)}


def _nic(plan: VmPlan) -> dict[str, Any]:
    ipconf = nm.NetworkInterfaceIPConfigurationPropertiesFormat(
        subnet=nm.Subnet(id=plan.subnet_id),
        private_ip_allocation_method="Static" if plan.ip else "Dynamic",
        private_ip_address=plan.ip,
        primary=True,
    )
    model = nm.NetworkInterface(
        location=plan.location,
        tags=plan.tags or None,
        properties=nm.NetworkInterfacePropertiesFormat(ip_configurations=[
            nm.NetworkInterfaceIPConfiguration(name="ipconfig1", properties=ipconf)]),
    )
    return {"type": NIC, "name": plan.nic_name, **_body(model)}


def _vm(plan: VmPlan) -> dict[str, Any]:
    model = cm.VirtualMachine(
        location=plan.location,
        tags=plan.tags or None,
        properties=cm.VirtualMachineProperties(
            hardware_profile=cm.HardwareProfile(vm_size=plan.vm_size),
            storage_profile=cm.StorageProfile(
                os_disk=cm.OSDisk(
                    create_option="Attach", os_type="Linux",
                    managed_disk=cm.ManagedDiskParameters(id=_rid(DISK, plan.os_disk.name))),
                data_disks=[
                    cm.DataDisk(lun=lun, create_option="Attach",
                                managed_disk=cm.ManagedDiskParameters(id=_rid(DISK, d.name)))
                    for lun, d in enumerate(plan.data_disks)],
            ),
            network_profile=cm.NetworkProfile(network_interfaces=[
                cm.NetworkInterfaceReference(
                    id=_rid(NIC, plan.nic_name),
                    properties=cm.NetworkInterfaceReferenceProperties(primary=True))]),
            # The serial log and screenshot: the proof of a boot (or why not) on Azure.
            # Without a storage URI Azure keeps them in managed storage.
            diagnostics_profile=cm.DiagnosticsProfile(
                boot_diagnostics=cm.BootDiagnostics(enabled=True,
                                                    storage_uri=plan.boot_diagnostics_uri)),
        ),
    )
    depends = [_rid(DISK, d.name) for d in (plan.os_disk, *plan.data_disks)]
    depends.append(_rid(NIC, plan.nic_name))
    return {"type": VM, "name": plan.vm_name, "dependsOn": depends, **_body(model)}


def build_template(plan: VmPlan) -> dict[str, Any]:
    """The deployment template for ``plan``: disks, NIC, VM, and the VM's id as output."""
    versions = api_versions()
    resources = [_disk(plan, d) for d in (plan.os_disk, *plan.data_disks)]
    resources += [_nic(plan), _vm(plan)]
    for r in resources:
        r["apiVersion"] = versions[r["type"]]
    return {
        "$schema": SCHEMA,
        "contentVersion": "1.0.0.0",
        "resources": resources,
        "outputs": {"vmId": {"type": "string", "value": _rid(VM, plan.vm_name)}},
    }


def template_json(template: dict[str, Any]) -> str:
    """The template as stable text: the same plan always gives the same bytes."""
    return json.dumps(template, indent=2, sort_keys=True) + "\n"


# Template-level keys of a resource, outside its model body.
_ENVELOPE = {"type", "apiVersion", "name", "dependsOn", "comments", "condition"}


def unknown_properties(template: dict[str, Any]) -> list[str]:
    """Every property of ``template``'s resources that its SDK model does not know, or
    that is read-only, as ``resources[i].path.to.key: why``. Empty: the template's
    bodies read back through the models whole."""
    problems: list[str] = []
    for i, res in enumerate(template.get("resources", [])):
        cls = MODELS.get(res.get("type", ""))
        where = f"resources[{i}]"
        if cls is None:
            problems.append(f"{where}.type: unknown resource type {res.get('type')!r}")
            continue
        if not res.get("apiVersion"):
            problems.append(f"{where}.apiVersion: missing")
        body = {k: v for k, v in res.items() if k not in _ENVELOPE}
        _walk(cls, body, where, problems)
    return problems


def _walk(cls: type[Any], data: dict[str, Any], where: str, problems: list[str]) -> None:
    # The SDK's models keep their fields in _attr_to_rest_field (rest name, visibility):
    # the only place the generated code states which properties exist. The class sets it
    # on its first instance, so the model is made first.
    model = cls(data)
    fields = {rf._rest_name: (attr, rf) for attr, rf in cls._attr_to_rest_field.items()}
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{where}.{key}: not a property of {cls.__name__}")
            continue
        attr, rf = fields[key]
        if rf._visibility == ["read"]:
            problems.append(f"{where}.{key}: read-only in {cls.__name__}")
        parsed = getattr(model, attr)
        if hasattr(type(parsed), "_attr_to_rest_field") and isinstance(value, dict):
            _walk(type(parsed), value, f"{where}.{key}", problems)
        elif isinstance(parsed, list) and isinstance(value, list):
            for j, (p, v) in enumerate(zip(parsed, value, strict=True)):
                if hasattr(type(p), "_attr_to_rest_field") and isinstance(v, dict):
                    _walk(type(p), v, f"{where}.{key}[{j}]", problems)
