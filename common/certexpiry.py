"""The not-after time of a daemon's own TLS certificates, as a Prometheus gauge.

Both servers expose it (``siterecovery_<component>_certificate_not_after_timestamp_
seconds{certificate}``) and deploy/prometheus alerts on expiry within 14 days. The files
are read at every scrape, so a certificate replaced in place (a reissue, a renewal) is
seen at once, with no restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


def not_after(path: Path) -> float | None:
    """The not-after time (UNIX seconds) of the first certificate in the PEM file at
    ``path``; None if it cannot be read or parsed."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return None


class CertificateExpiry(Collector):
    """The gauge ``name``: the not-after time of each certificate file of ``paths``, by
    ``certificate`` label. A file that cannot be read has no sample (an alert on its
    expiry stays silent rather than firing on a guess; the daemon's TLS fails loudly)."""

    def __init__(self, name: str, doc: str, paths: dict[str, Path]) -> None:
        self.name, self.doc, self.paths = name, doc, dict(paths)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.doc, labels=["certificate"])

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(self.name, self.doc, labels=["certificate"])
        for label, path in sorted(self.paths.items()):
            t = not_after(path)
            if t is not None:
                g.add_metric([label], t)
        yield g
