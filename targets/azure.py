"""The Azure target: the point's disks as fixed-VHD page blobs, and an ARM template.

``create`` uploads each restored raw disk as a fixed VHD page blob
(``targets.pageblob``: non-zero ranges only, in parallel, resumable) into the target
container under ``PREFIX/VM_NAME/DISK.vhd``, builds the deployment template from the
Azure SDK's models (``targets.armtemplate``), checks it against those models, and
stores it beside the disks as ``VM_NAME/template.json``. Only when Azure Resource
Manager credentials are configured (``ArmCredentials``) is the template deployed
(``targets.azurearm``), ``boot`` waits for the proof in the VM's serial log (boot
diagnostics) and ``cleanup`` deletes the VM, NIC, disks and deployment; without them the
recovery stops at the blobs and the template (an operator can deploy it by hand),
``submit`` refuses with ``azure_credentials_missing``, and ``boot`` returns None: no
boot can be proven.

The machine's generation follows its restored OS disk (``targets.bootmode``): BIOS boot
code makes a Generation 1 machine, an EFI system partition a Generation 2 one; ``check``
reads it once the disk is restored (before, it judges by the item's settings alone).

Blob credentials follow the vault's rules (``vault.store.azure``): a connection string
or an account key or SAS from a file or the environment, never in the URL, never logged.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.blob.aio import ContainerClient

from common.backoff import Backoff
from targets.armtemplate import (
    DiskPlan,
    VmPlan,
    build_template,
    subnet_id,
    template_json,
    unknown_properties,
)
from targets.azurearm import DELETE_ORDER, DEPLOYMENT, Arm, ArmCredentials, template_refs
from targets.azurecheck import GENERATION, Assessment, assess, managed_disk_name
from targets.base import (
    BootFailedError,
    BootProof,
    Recovered,
    RecoveryDisk,
    RecoverySpec,
    Refusal,
    TargetError,
)
from targets.bootmode import BootMode, detect_boot
from targets.console import proves_boot
from targets.pageblob import PageBlobError, upload_vhd
from targets.verify import PartitionTableError
from vault.errors import StoreError
from vault.store.azure import AzureBlobStore

__all__ = ["ArmCredentials", "AzureSettings", "AzureTarget"]

NOT_CONFIGURED = ("Azure credentials not configured: the disks and the template are in "
                  "blob storage, nothing was deployed")
NOT_CONFIGURED_HINT = ("set the target's subscription_id, tenant_id, client_id and "
                       "client_secret_file (a service principal), or deploy template.json "
                       "by hand (az deployment group create --template-file template.json)")
TAIL = 25


@dataclass(frozen=True)
class AzureSettings:
    """Where and how recovered machines are made in Azure."""

    location: str  # the region: westeurope, eastus2 …
    resource_group: str
    storage_account_id: str  # resource id of the account holding the page blobs
    network: str | None = None  # VNET/SUBNET (or subnet id) for failovers
    drill_network: str | None = None  # an isolated VNET/SUBNET for drills
    vm_size: str | None = None  # None: the smallest offered size fitting CPUs and memory
    disk_sku: str = "Standard_LRS"
    concurrency: int = 8  # page uploads in flight per disk
    arm: ArmCredentials | None = None  # None: templates are made, not deployed
    tags: dict[str, str] = field(default_factory=dict)
    # https://ACCOUNT.blob.core.windows.net/ for boot diagnostics (None: managed storage)
    boot_diagnostics_storage_uri: str | None = None

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> AzureSettings:
        """Settings from a config table (``[targets.azure]``): the fields above by name,
        ``arm`` a table of ``ArmCredentials``' fields. Raises ``ValueError`` naming the
        key for an unknown key, a missing required one or a value of the wrong type."""
        strs = ("location", "resource_group", "storage_account_id")
        opt = ("network", "drill_network", "vm_size", "boot_diagnostics_storage_uri")
        known = {*strs, *opt, "disk_sku", "concurrency", "arm", "tags"}
        unknown = sorted(set(m) - known)
        if unknown:
            raise ValueError(f"unknown Azure target setting(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(known))}")
        for k in strs:
            if not isinstance(m.get(k), str) or not m[k]:
                raise ValueError(f"Azure target setting {k} is required (a string)")
        for k in (*opt, "disk_sku"):
            if k in m and not isinstance(m[k], str):
                raise ValueError(f"Azure target setting {k} must be a string")
        conc = m.get("concurrency", 8)
        if not isinstance(conc, int) or isinstance(conc, bool) or not 1 <= conc <= 64:
            raise ValueError("Azure target setting concurrency must be an integer 1-64")
        tags = m.get("tags", {})
        if not isinstance(tags, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise ValueError("Azure target setting tags must be a table of strings")
        diag = m.get("boot_diagnostics_storage_uri")
        if diag is not None and (not diag.startswith("https://") or "?" in diag):
            raise ValueError("Azure target setting boot_diagnostics_storage_uri must be a "
                             "storage account's blob endpoint, https://ACCOUNT.blob.core."
                             "windows.net/, without a SAS (omit it for managed storage)")
        arm = None
        if "arm" in m:
            a = m["arm"]
            fields = ("subscription_id", "tenant_id", "client_id", "client_secret_file")
            if not isinstance(a, Mapping) or set(a) != set(fields) or not all(
                    isinstance(a[f], str) and a[f] for f in fields):
                raise ValueError(f"Azure target setting arm needs exactly {', '.join(fields)} "
                                 "(strings)")
            arm = ArmCredentials(a["subscription_id"], a["tenant_id"], a["client_id"],
                                 Path(a["client_secret_file"]))
        return cls(location=m["location"], resource_group=m["resource_group"],
                   storage_account_id=m["storage_account_id"], network=m.get("network"),
                   drill_network=m.get("drill_network"), vm_size=m.get("vm_size"),
                   disk_sku=m.get("disk_sku", "Standard_LRS"), concurrency=conc, arm=arm,
                   tags=dict(tags), boot_diagnostics_storage_uri=diag)


class AzureTarget:
    name = "azure"

    def __init__(self, container: ContainerClient, settings: AzureSettings, *,
                 prefix: str = "", store: AzureBlobStore | None = None,
                 backoff: Callable[[], Backoff] = Backoff,
                 boot_poll: Callable[[], Backoff] = lambda: Backoff(base=5.0, cap=20.0)
                 ) -> None:
        self._c = container
        self._backoff = backoff  # the waits between retries of one page write
        self._boot_poll = boot_poll  # the waits between reads of a booting VM's serial log
        self._s = settings
        self._prefix = prefix
        self._store = store  # closed with the target when it opened the container

    @classmethod
    def open(cls, url: str, settings: AzureSettings) -> AzureTarget:
        """The target on ``azure://CONTAINER[/PREFIX]?…``, credentials as for a vault."""
        try:
            store = AzureBlobStore.from_url(url)
        except StoreError as e:
            raise TargetError("azure_storage_unusable", str(e),
                              "give the target container's credentials as for a vault") from None
        # vault.store.azure owns URL and credential parsing: one set of rules for both.
        return cls(store.container, settings, prefix=store.prefix, store=store)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()

    def network_for(self, spec: RecoverySpec) -> str | None:
        """The subnet this recovery uses: the spec's, else the target's drill or failover
        network. An item's network is a plain name (its settings allow no ``/``): it names
        a subnet of the VNet of the target's network for the same kind of recovery."""
        default = self._s.drill_network if spec.drill else self._s.network
        if spec.network is None:
            return default
        if "/" in spec.network or default is None or "/" not in default:
            return spec.network
        return f"{default.rsplit('/', 1)[0]}/{spec.network}"

    async def check(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> list[Refusal]:
        return (await self.assess(spec, disks)).refusals

    async def assess(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> Assessment:
        """``check``'s refusals with the firmware and size the machine would get. The OS
        disk's boot mode is read when it is restored (an image of its full size)."""
        boot: BootMode | None = None
        unreadable: list[Refusal] = []
        if disks and _restored(disks[0]):
            try:
                boot = await asyncio.to_thread(detect_boot, disks[0].path)
            except PartitionTableError as e:
                unreadable.append(Refusal("disks", f"OS disk {disks[0].name}: {e.message}; "
                                                   f"{e.hint}"))
        found = assess(spec, disks, vm_size=self._s.vm_size, network=self.network_for(spec),
                       boot=boot)
        return replace(found, refusals=[*unreadable, *found.refusals])

    def blob_name(self, vm_name: str, leaf: str) -> str:
        return f"{self._prefix}{vm_name}/{leaf}"

    def planned(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> Recovered:
        """The page blobs and the template ``create`` writes (what a deployment makes is
        named on the recovery before it starts: ``submit``)."""
        c = self._c.container_name
        return Recovered(self.name, spec.vm_name, [
            *(f"blob:{c}/{self.blob_name(spec.vm_name, f'{d.name}.vhd')}" for d in disks),
            f"blob:{c}/{self.blob_name(spec.vm_name, 'template.json')}"])

    async def create(self, spec: RecoverySpec, disks: list[RecoveryDisk]) -> Recovered:
        """Upload the disks, write the template and, with credentials, deploy it.

        Refuses (``azure_refused``) what ``check`` refuses. On a failure part way the
        error's ``recovered`` names every blob begun, for ``cleanup``."""
        found = await self.assess(spec, disks)
        if found.refusals:
            raise TargetError("azure_refused", "; ".join(r.message for r in found.refusals),
                              "change the item's recovery settings")
        rec = Recovered(target=self.name, vm_name=spec.vm_name)
        size = found.vm_size
        assert size is not None  # assess refused otherwise
        rec.details["vm_size"] = size
        rec.details["firmware"] = found.firmware_note
        rec.details["boot_marker"] = spec.boot_marker or ""
        network = self.network_for(spec)
        assert network is not None
        plans: list[DiskPlan] = []
        try:
            await self._ensure_container()
            for d in disks:
                name = self.blob_name(spec.vm_name, f"{d.name}.vhd")
                rec.resources.append(f"blob:{self._c.container_name}/{name}")
                report = await upload_vhd(self._c.get_blob_client(name), d.path,
                                          concurrency=self._s.concurrency,
                                          backoff=self._backoff)
                rec.details[f"disk:{d.name}"] = (f"{report.url} ({report.vhd_size} bytes, "
                                                 f"{report.uploaded} extents written, "
                                                 f"{report.skipped} already there)")
                plans.append(DiskPlan(managed_disk_name(spec.vm_name, d.name), report.url))
            plan = VmPlan(vm_name=spec.vm_name, location=self._s.location, vm_size=size,
                          generation=GENERATION[found.firmware],
                          storage_account_id=self._s.storage_account_id,
                          subnet_id=subnet_id(network), ip=spec.ip, os_disk=plans[0],
                          data_disks=plans[1:], disk_sku=self._s.disk_sku,
                          boot_diagnostics_uri=self._s.boot_diagnostics_storage_uri,
                          tags={**self._s.tags, "siterecovery-machine": spec.machine,
                                "siterecovery-drill": "true" if spec.drill else "false"})
            template = build_template(plan)
            problems = unknown_properties(template)
            if problems:
                raise TargetError("azure_template_invalid", "; ".join(problems),
                                  "a bug: report it with the template", recovered=rec)
            tname = self.blob_name(spec.vm_name, "template.json")
            rec.resources.append(f"blob:{self._c.container_name}/{tname}")
            text = template_json(template).encode()
            await self._c.get_blob_client(tname).upload_blob(
                io.BytesIO(text), length=len(text), overwrite=True, validate_content=True)
            rec.details["template"] = tname
        except PageBlobError as e:
            raise TargetError("azure_upload_failed", str(e),
                              "run the recovery again: uploads resume where they stopped",
                              recovered=rec) from None
        except AzureError as e:
            raise TargetError("azure_upload_failed", f"cannot store the template: "
                              f"{type(e).__name__}", "run the recovery again",
                              recovered=rec) from None
        if self._s.arm is None:
            rec.details["deployment"] = NOT_CONFIGURED
            return rec
        await self.submit(rec)
        return rec

    async def _ensure_container(self) -> None:
        try:
            await self._c.create_container()
        except ResourceExistsError:
            pass
        except HttpResponseError as e:
            # A SAS limited to the container's blobs may not create it: if it does not
            # exist, the first upload says so.
            if e.status_code != 403:
                raise

    async def submit(self, recovered: Recovered) -> None:
        """Deploy the template ``create`` stored, into the target resource group, as
        deployment ``siterecovery-VM_NAME`` (incremental: run again, it completes a
        deployment that failed part way).

        Raises ``TargetError('azure_credentials_missing')`` without ARM credentials, and
        the codes of ``targets.azurearm.arm_error`` when Azure refuses. The resources the
        template makes, and the deployment, are named on ``recovered`` before it starts,
        so a failed deployment can be cleaned up."""
        arm = self._s.arm
        if arm is None:
            raise TargetError("azure_credentials_missing", NOT_CONFIGURED, NOT_CONFIGURED_HINT)
        tname = recovered.details["template"]
        try:
            stream = await self._c.get_blob_client(tname).download_blob()
            template = json.loads(await stream.readall())
        except AzureError as e:
            raise TargetError("azure_template_missing", f"cannot read {tname}: "
                              f"{type(e).__name__}", "run the recovery again") from None
        deployment = f"siterecovery-{recovered.vm_name}"
        for ref in [*template_refs(template), f"{DEPLOYMENT}:{deployment}"]:
            if ref not in recovered.resources:
                recovered.resources.append(ref)
        try:
            await Arm(arm, self._s.resource_group).deploy(deployment, template, recovered)
        except TargetError as e:
            e.recovered = recovered  # what was begun is cleaned up whatever failed
            raise
        recovered.details["deployment"] = deployment
        recovered.details["deployed_at"] = repr(time.time())

    async def boot(self, recovered: Recovered, timeout: float) -> BootProof | None:
        """Wait for the boot marker (or a login prompt) in the deployed VM's serial log,
        read from its boot diagnostics. None when nothing was deployed (no credentials):
        no boot can be proven then. Raises ``BootFailedError`` with the log's last lines
        when ``timeout`` passes without it."""
        if self._s.arm is None or "deployed_at" not in recovered.details:
            return None
        arm = Arm(self._s.arm, self._s.resource_group)
        marker = recovered.details.get("boot_marker") or None
        deployed_at = float(recovered.details["deployed_at"])
        deadline = time.monotonic() + timeout
        # Azure writes the serial log in batches: poll it, not too often.
        wait = self._boot_poll()
        lines: list[str] = []
        while True:
            try:
                lines = await arm.serial_log(recovered.vm_name)
            except TargetError as e:
                # An outage may pass before the deadline; anything else will not.
                if e.code != "azure_unreachable" or time.monotonic() >= deadline:
                    raise BootFailedError(f"cannot read the serial log of {recovered.vm_name}"
                                          f": {e.message} ({e.code}: {e.hint})",
                                          lines[-TAIL:]) from None
            hit = next((ln for ln in lines if proves_boot(ln, marker)), None)
            if hit is not None:
                return BootProof(seconds=round(time.time() - deployed_at, 3),
                                 matched=hit.strip(), console_tail=lines[-TAIL:])
            left = deadline - time.monotonic()
            if left <= 0:
                raise BootFailedError(
                    f"{recovered.vm_name} showed no {marker or 'login prompt'} in its serial "
                    f"log (boot diagnostics) within {timeout:.0f} s", lines[-TAIL:])
            await asyncio.sleep(min(wait.next(), left))

    async def cleanup(self, recovered: Recovered) -> None:
        """Delete what ``create`` made: deployed resources (with credentials), then blobs.

        Idempotent. Without credentials, deployed resources cannot be deleted: the blobs
        are deleted and ``azure_credentials_missing`` names what is left."""
        arm_refs = [r for r in recovered.resources if r.split(":", 1)[0] in DELETE_ORDER]
        left: list[str] = []
        if arm_refs and self._s.arm is None:
            left = arm_refs
        elif arm_refs:
            assert self._s.arm is not None
            await Arm(self._s.arm, self._s.resource_group).delete(arm_refs)
        for ref in recovered.resources:
            kind, _, rest = ref.partition(":")
            if kind != "blob":
                continue
            container, _, name = rest.partition("/")
            if container != self._c.container_name:
                left.append(ref)
                continue
            try:
                await self._c.delete_blob(name, delete_snapshots="include")
            except ResourceNotFoundError:
                pass
            except AzureError as e:
                raise TargetError("azure_cleanup_failed", f"cannot delete blob {name}: "
                                  f"{type(e).__name__}", "run the cleanup again") from None
        if left:
            raise TargetError("azure_credentials_missing",
                              f"{NOT_CONFIGURED}; not deleted: {', '.join(left)}",
                              NOT_CONFIGURED_HINT)


def _restored(disk: RecoveryDisk) -> bool:
    # check runs before the restore too (on the disks as they will be): only an image of
    # the disk's full size is read
    try:
        return disk.path.stat().st_size == disk.size
    except OSError:
        return False
