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
from targets.base import Target
from targets.folder import FolderTarget
from targets.verify import verify_image


def kinds(deps: FailoverDeps) -> Mapping[str, JobKind]:
    return by_name((*replication.KINDS, *failover.kinds(deps)))


def targets_of(cfg: ConfigServerConfig) -> dict[str, Target]:
    """The recovery targets this server offers: the folder target under the data dir
    (``<data_dir>/recovered/<vm>/``)."""
    return {"folder": FolderTarget(Path(cfg.data_dir) / "recovered")}


def for_config(cfg: ConfigServerConfig) -> Mapping[str, JobKind]:
    """The kinds the daemon of ``cfg`` runs, bound to its targets and work folder."""
    return kinds(FailoverDeps(targets=targets_of(cfg),
                              work_root=Path(cfg.data_dir) / "failover-work",
                              check_disk=verify_image))


KINDS: Mapping[str, JobKind] = kinds(FailoverDeps(targets={}, work_root=Path("/nonexistent")))
