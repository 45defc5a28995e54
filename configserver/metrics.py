"""The configuration server's Prometheus metrics (see STYLE.md for the naming rules)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class ConfigMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.points = Counter("siterecovery_configserver_recovery_points",
                              "Recovery points recorded in the catalog", registry=self.registry)
