"""Prometheus metrics of one process server (own registry: several may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ProcMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "siterecovery_procserver_"
        self.received_bytes = Counter(p + "received_bytes", "Block bytes received from agents",
                                      registry=r)
        self.uploaded_bytes = Counter(p + "uploaded_bytes", "Sealed pack bytes uploaded",
                                      registry=r)
        self.points = Counter(p + "recovery_points", "Recovery points written to the vault",
                              registry=r)
        self.rejected = Counter(p + "rejected_sessions", "Sessions refused or ended by an error",
                                ["reason"], registry=r)
        self.sessions = Gauge(p + "sessions", "Agent sessions open now", registry=r)
        self.cache_bytes = Gauge(p + "cache_bytes", "Bytes held in the HRL cache", registry=r)
        self.backlog_cycles = Gauge(p + "upload_backlog_cycles",
                                    "Acknowledged cycles not yet uploaded", registry=r)
        self.handshakes = Gauge(p + "tls_handshakes", "TCP connections whose TLS handshake "
                                "is in progress", registry=r)
        self.rejected_handshakes = Counter(
            p + "rejected_handshakes", "Connections closed before or during the TLS handshake",
            ["reason"], registry=r)
        self.receive_buffer_bytes = Gauge(
            p + "receive_buffer_bytes", "Bytes received from agents and held in memory: not "
            "yet parsed, or handed to the cache writers and not yet written", registry=r)
        self.suspended_cycles = Gauge(p + "suspended_cycles", "Resumable cycles whose agent "
                                      "is disconnected", registry=r)
        self.resumed_cycles = Counter(p + "resumed_cycles", "Cycles resumed after a "
                                      "disconnect", registry=r)
        self.heartbeats_sent = Counter(p + "heartbeats_sent", "HEARTBEAT frames sent to agents",
                                       registry=r)
        self.heartbeats_received = Counter(p + "heartbeats_received",
                                           "HEARTBEAT frames received from agents", registry=r)
