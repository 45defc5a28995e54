"""The configuration server's Prometheus metrics (see STYLE.md for the naming rules)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from common.certexpiry import CertificateExpiry

CERT_EXPIRY = "siterecovery_configserver_certificate_not_after_timestamp_seconds"


class ConfigMetrics:
    _certs: CertificateExpiry | None = None  # watch_certificates

    def watch_certificates(self, site: Path, ca: Path) -> None:
        """Expose the not-after times of the site listener's certificate and of the CA
        (``certificate`` = ``site``, ``ca``)."""
        paths = {"site": site, "ca": ca}
        if self._certs is not None:  # started again: the same collector, the new files
            self._certs.paths = paths
            return
        self._certs = CertificateExpiry(
            CERT_EXPIRY, "Not-after time of the configuration server's site certificate "
            "and of its CA (UNIX seconds)", paths)
        self.registry.register(self._certs)

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.points = Counter("siterecovery_configserver_recovery_points",
                              "Recovery points recorded in the catalog", registry=self.registry)
        # Alerts and the health they are computed from (configserver/alerts.py).
        r, ps = self.registry, "siterecovery_configserver_procserver_"
        self.alerts_active = Gauge("siterecovery_configserver_alerts_active",
                                   "Active alerts by severity and code", ["severity", "code"],
                                   registry=r)
        self.ps_cache_free = Gauge(ps + "cache_free_ratio", "Free share of a process server's "
                                   "cache quota at its last heartbeat", ["procserver"], registry=r)
        self.ps_backlog_seconds = Gauge(ps + "upload_backlog_seconds", "Age of the oldest data "
                                        "waiting for upload at the last heartbeat",
                                        ["procserver"], registry=r)
        self.ps_backlog_bytes = Gauge(ps + "upload_backlog_bytes", "Cached bytes waiting for "
                                      "upload at the last heartbeat", ["procserver"], registry=r)
        self.ps_heartbeat_age = Gauge(ps + "heartbeat_age_seconds", "Seconds since the process "
                                      "server's last heartbeat", ["procserver"], registry=r)
        self.ps_heartbeats = Counter(ps + "heartbeats", "Heartbeats received from a process "
                                     "server", ["procserver"], registry=r)
        self.item_rpo = Gauge("siterecovery_configserver_item_rpo_seconds", "Age of a replicated "
                              "item's latest recovery point (its current RPO)", ["machine"],
                              registry=r)
        # Drill freshness: items that had a successful drill (test failover) only.
        self.item_drill_time = Gauge("siterecovery_configserver_item_last_drill_success_"
                                     "timestamp_seconds", "When a replicated item's last "
                                     "successful drill ended (UNIX seconds)", ["machine"],
                                     registry=r)
        self.item_drill_rto = Gauge("siterecovery_configserver_item_last_drill_rto_seconds",
                                    "The RTO a replicated item's last successful drill "
                                    "measured (command to booted, or to created where the "
                                    "target cannot boot)", ["machine"], registry=r)
        self.ps_storage_failing = Gauge(ps + "storage_failing_seconds", "How long a process "
                                        "server's uploads to the vault have been failing "
                                        "without a success, at its last heartbeat (0: not "
                                        "failing)", ["procserver"], registry=r)
        # Trust (configserver/certs.py, api_certs.py): certificates and enrollment.
        self.certs_issued = Counter("siterecovery_configserver_certificates_issued",
                                    "Certificates the CA issued and recorded, by kind", ["kind"],
                                    registry=r)
        self.enrollments = Counter("siterecovery_configserver_enrollments",
                                   "Agent enrollment attempts with the passphrase, by outcome "
                                   "(ok, wrong_passphrase, throttled, machine_not_found, "
                                   "machine_disabled)", ["outcome"], registry=r)
        # Jobs (configserver/jobs.py) and agents (api_agent.py).
        self.jobs = Counter("siterecovery_configserver_jobs", "Jobs that ended, by kind and "
                            "result (succeeded, failed, cancelled)", ["kind", "result"],
                            registry=r)
        self.jobs_resumed = Counter("siterecovery_configserver_jobs_resumed", "Jobs resumed "
                                    "after a configuration-server restart", ["kind"], registry=r)
        self.job_engine_errors = Counter("siterecovery_configserver_job_engine_errors",
                                         "Job runs interrupted by an engine error (e.g. the "
                                         "database was unreachable); retried", registry=r)
        self.agent_heartbeats = Counter("siterecovery_configserver_agent_heartbeats",
                                        "Heartbeats received from Mobility agents", registry=r)
        # Alert notices (configserver/notifydeliver.py), by channel kind.
        self.notifications = Counter("siterecovery_configserver_notifications",
                                     "Alert notices sent through notification channels, by "
                                     "channel kind and result (delivered; failed: an attempt "
                                     "that will be retried; gave_up: retries used up)",
                                     ["kind", "result"], registry=r)
        self.notify_pending = Gauge("siterecovery_configserver_notifications_pending",
                                    "Notices in the outbox waiting for delivery",
                                    registry=r)
        # Verification of recovery points (configserver/verifyjob.py), by machine.
        self.verify_last = Gauge("siterecovery_configserver_verify_last_timestamp_seconds",
                                 "When a machine's points were last verified (UNIX seconds)",
                                 ["machine"], registry=r)
        self.agent_long_polls = Gauge("siterecovery_configserver_agent_long_polls",
                                      "Agents waiting in GET /api/v1/agent/settings/changes "
                                      "(between two settings pulls)", registry=r)
        self.unrecoverable = Gauge("siterecovery_configserver_unrecoverable_items",
                                   "Replicated items while this server is not registered "
                                   "with a vault: none of them can be drilled, failed over "
                                   "or verified until it is (0 once registered)", registry=r)
        self.verify_failed = Gauge("siterecovery_configserver_verify_failed_points",
                                   "A machine's retained points whose last verification "
                                   "failed", ["machine"], registry=r)
        self.verify_unverified = Gauge("siterecovery_configserver_verify_unverified_points",
                                       "Retained points not verified within "
                                       "verify_reverify_days, at the last verification",
                                       ["machine"], registry=r)
