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

from configserver import failover, replication
from configserver.config import ConfigServerConfig
from configserver.failover import FailoverDeps
from configserver.jobdefs import JobKind, by_name
from targets.azure import AzureSettings, AzureTarget
from targets.base import Target
from targets.folder import FolderTarget
from targets.libvirt import LibvirtTarget
from targets.verify import verify_image


def kinds(deps: FailoverDeps) -> Mapping[str, JobKind]:
    return by_name((*replication.KINDS, *failover.kinds(deps)))


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
        out["azure"] = AzureTarget.open(cfg.azure_target_url,
                                        AzureSettings.from_mapping(cfg.azure_target))
    return out


def for_config(cfg: ConfigServerConfig) -> Mapping[str, JobKind]:
    """The kinds the daemon of ``cfg`` runs, bound to its targets and work folder."""
    return kinds(FailoverDeps(targets=targets_of(cfg),
                              work_root=Path(cfg.data_dir) / "failover-work",
                              check_disk=verify_image))


KINDS: Mapping[str, JobKind] = kinds(FailoverDeps(targets={}, work_root=Path("/nonexistent")))
