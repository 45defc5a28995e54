"""The configuration server's background work: alerts, the own certificate, the job engine."""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from configserver import (
    alerts,
    certs,
    gcjob,
    groupsettle,
    notifydeliver,
    pshealth,
    verifyjob,
)
from configserver.services import Services


def background_tasks(services: Services) -> list[Coroutine[Any, Any, None]]:
    """The coroutines the daemon runs as tasks for as long as it runs."""
    site_pem = Path(services.cfg.data_dir) / "tls" / "site.pem"  # see ConfigServer._site_tls
    return [alerts.run(services, services.alert_book, services.cfg.alert_interval_seconds),
            certs.record_own(services, site_pem), services.jobs.run(),
            notifydeliver.run(services, services.cfg.secrets_key_path),
            verifyjob.schedule(services, services.cfg.verify_interval_hours, {
                "reverify_days": services.cfg.verify_reverify_days,
                "daily_share": services.cfg.verify_daily_share_percent,
                **verifyjob.budget(services.cfg.gc_memory_mib, services.cfg.data_dir)}),
            gcjob.schedule(services, services.cfg.prune_interval_hours,
                           gcjob.budget(services.cfg.gc_memory_mib)),
            pshealth.run(services, services.alert_book.up_since,
                         services.cfg.alert_interval_seconds,
                         services.cfg.procserver_failover_seconds),
            groupsettle.run(services, services.cfg.alert_interval_seconds),
            services.agent_watch.run(services)]
