"""Prometheus metrics of one process server (own registry: several may share a process)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.certexpiry import CertificateExpiry

CERT_EXPIRY = "siterecovery_procserver_certificate_not_after_timestamp_seconds"


class ProcMetrics:
    _certs: CertificateExpiry | None = None  # watch_certificates

    def watch_certificates(self, server: Path, ca: Path) -> None:
        """Expose the not-after times of the process server's TLS certificate and of the
        CA it trusts (``certificate`` = ``server``, ``ca``)."""
        paths = {"server": server, "ca": ca}
        if self._certs is not None:  # started again: the same collector, the new files
            self._certs.paths = paths
            return
        self._certs = CertificateExpiry(
            CERT_EXPIRY, "Not-after time of the process server's TLS certificate and of "
            "its CA (UNIX seconds)", paths)
        self.registry.register(self._certs)

    def pack_uploaded(self, logical: int, stored: int) -> None:
        """A pack is in the vault: ``logical`` bytes of blocks sealed into ``stored`` bytes."""
        self.uploaded_bytes.inc(stored)
        self.stored_logical_bytes.inc(logical)
        self._logical_total += logical
        self._stored_total += stored
        self.compression_ratio.set(self._logical_total / self._stored_total)

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "siterecovery_procserver_"
        self.received_bytes = Counter(p + "received_bytes", "Block bytes received from agents",
                                      registry=r)
        self.uploaded_bytes = Counter(p + "uploaded_bytes", "Sealed pack bytes uploaded",
                                      registry=r)
        self.stored_logical_bytes = Counter(
            p + "stored_logical_bytes", "Block bytes sealed into the packs uploaded, before "
            "compression (uploaded_bytes is after)", registry=r)
        self.compression_ratio = Gauge(
            p + "compression_ratio", "stored_logical_bytes / uploaded_bytes since the process "
            "started (NaN until the first pack)", registry=r)
        self.compression_ratio.set(float("nan"))
        self._logical_total = self._stored_total = 0
        self.points = Counter(p + "recovery_points", "Recovery points written to the vault",
                              registry=r)
        self.rejected = Counter(p + "rejected_sessions", "Sessions refused or ended by an error",
                                ["reason"], registry=r)
        self.sessions = Gauge(p + "sessions", "Agent sessions open now", registry=r)
        self.cache_bytes = Gauge(p + "cache_bytes", "Bytes held in the HRL cache", registry=r)
        # Set at scrape time (procserver/scrape.py refresh_metrics).
        self.cache_free_ratio = Gauge(p + "cache_free_ratio", "Share of the cache quota the "
                                      "cache may still grow by (0-1; at most the disk's free "
                                      "space)", registry=r)
        self.upload_backlog_seconds = Gauge(p + "upload_backlog_seconds", "Age of the oldest "
                                            "received data not yet uploaded", registry=r)
        self.item_rpo = Gauge(p + "item_rpo_seconds", "Age of the newest recovery point of a "
                              "machine", ["machine"], registry=r)
        self.item_rpo_threshold = Gauge(p + "item_rpo_threshold_seconds", "RPO threshold of "
                                        "the machine's policy", ["machine"], registry=r)
        self.backlog_cycles = Gauge(p + "upload_backlog_cycles",
                                    "Acknowledged cycles not yet uploaded", registry=r)
        # The process server's shared vault lock (procserver/vaultlock.py), held only while
        # uploads write: waits for it (long: a prune or rebuild-index held it
        # exclusively), how often it was taken, uploads waiting now.
        self.vault_lock_wait_seconds = Histogram(
            p + "vault_lock_wait_seconds", "Seconds an acquisition of the vault lock waited "
            "(long: a prune or rebuild-index held it exclusively), by mode", ["mode"],
            buckets=(0.01, 0.05, 0.25, 1, 5, 30, 120, 600), registry=r)
        self.vault_lock_acquisitions = Counter(
            p + "vault_lock_acquisitions", "Vault locks taken, by mode (the uploads take the "
            "shared lock when they start writing and let it go when they wait)", ["mode"],
            registry=r)
        self.vault_lock_waiting = Gauge(p + "vault_lock_waiting", "Uploads waiting for the "
                                        "vault's shared lock now", registry=r)
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
        self.resync_bases = Counter(p + "resync_bases", "Fingerprint maps of vault points "
                                    "sent to agents to resync against", registry=r)
        # procserver/heap.py: the heap's free pages given back after points are written.
        self.heap_trims = Counter(p + "heap_trims", "Times the heap's free pages were "
                                  "given back to the system (after points written)",
                                  registry=r)
        self.heap_released_bytes = Counter(p + "heap_released_bytes", "Resident bytes the "
                                           "heap trims gave back to the system", registry=r)
        self.group_points = Counter(p + "group_points", "Group points of consistency groups "
                                    "whose barrier this server held, by outcome "
                                    "(released, failed)", ["state"], registry=r)
