"""Every job kind a configuration server runs: one explicit list, given to the
``JobEngine`` and to the jobs API (titles, the ``kind`` filter) by the daemon.

The failover kinds are built around what they use (``failover.FailoverDeps``): the
targets by name, built here from the server's configuration, and the disk check
(``targets.verify.verify_image``: partition table, read-only fsck). ``for_config(cfg)``
is what the daemon runs; ``KINDS`` (the same kinds with no target) gives the API the
kinds' names and titles.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import structlog

from configserver import (
    failback,
    failover,
    gcjob,
    installjob,
    planjobs,
    pshealth,
    replication,
    reprotect,
    verifyjob,
)
from configserver.config import ConfigServerConfig
from configserver.failover import FailoverDeps
from configserver.jobdefs import JobKind, by_name
from targets.base import Target
from targets.folder import FolderTarget
from targets.libvirt import LibvirtTarget
from targets.loopdev import detach_stale_loops
from targets.verify import verify_image
from vault.manifestcache import ManifestCache

log = structlog.get_logger("configserver")


def kinds(deps: FailoverDeps) -> Mapping[str, JobKind]:
    return by_name((*replication.KINDS, *failover.kinds(deps), *failback.kinds(deps),
                    *reprotect.kinds(deps), *verifyjob.KINDS,
                    *gcjob.KINDS, *installjob.KINDS, *planjobs.KINDS, *pshealth.KINDS))


def targets_of(cfg: ConfigServerConfig) -> dict[str, Target]:
    """The recovery targets this server offers: always the folder target
    (``recovered_dir``, default ``<data_dir>/recovered/<vm>/``); libvirt when
    ``libvirt_uri`` is set; Azure when ``azure_target_url`` is set."""
    data = Path(cfg.data_dir)
    out: dict[str, Target] = {
        "folder": FolderTarget(cfg.recovered_dir or data / "recovered", cfg.folder_format)}
    if cfg.libvirt_uri:
        out["libvirt"] = LibvirtTarget(
            cfg.libvirt_uri, Path(cfg.libvirt_image_dir or data / "libvirt"),
            network=cfg.libvirt_network, drill_subnet=cfg.libvirt_drill_subnet,
            accel=cfg.libvirt_accel)
    if cfg.azure_target_url:
        # Only a server with an Azure target loads the Azure management SDK: its models
        # cost about 0.7 s and 70 MB to import, in every process that runs the
        # ``siterecovery`` command (agents included), which imports this module.
        from targets.azure import AzureSettings, AzureTarget

        out["azure"] = AzureTarget.open(cfg.azure_target_url,
                                        AzureSettings.from_mapping(cfg.azure_target))
    return out


def for_config(cfg: ConfigServerConfig, targets: dict[str, Target],
               manifests: ManifestCache) -> Mapping[str, JobKind]:
    """The kinds the daemon of ``cfg`` runs, bound to its ``targets`` (``targets_of``:
    the daemon closes them when it stops), its work folder and the point manifests its
    recovery jobs share.

    Called once, when the daemon starts its job engine and before any job runs: the loop
    devices a check left attached over the work folder (the server killed during a disk
    check) are detached here, as nothing else would ever free them."""
    work_root = Path(cfg.data_dir) / "failover-work"
    free_stale_loops(work_root)
    return kinds(FailoverDeps(targets=targets, work_root=work_root,
                              check_disk=verify_image,
                              boot_timeout=cfg.failover_boot_timeout_seconds,
                              drain_timeout=cfg.failover_drain_timeout_seconds,
                              shutdown_timeout=cfg.failover_shutdown_timeout_seconds,
                              manifests=manifests))


def free_stale_loops(work_root: Path) -> list[str]:
    """Detach the loop devices left over ``work_root``; log and return them. Without
    losetup (or without root) there is nothing the checks could have attached."""
    try:
        freed = detach_stale_loops(work_root)
    except OSError as e:  # losetup missing: the disk checks cannot have run either
        log.info("stale_loops_not_checked", work_root=str(work_root), error=str(e))
        return []
    if freed:
        log.warning("stale_loops_detached", work_root=str(work_root), devices=freed)
    return freed


KINDS: Mapping[str, JobKind] = kinds(FailoverDeps(targets={}, work_root=Path("/nonexistent")))
