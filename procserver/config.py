"""The process server's typed configuration (one flat TOML file)."""

from __future__ import annotations

from dataclasses import dataclass

from procserver.wire import DEFAULT_PORT


@dataclass(frozen=True)
class ProcServerConfig:
    data_dir: str
    vault_url: str
    vault_key_file: str
    tls_cert: str
    tls_key: str
    tls_ca: str
    listen_host: str = "127.0.0.1"
    listen_port: int = DEFAULT_PORT
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9444
    configserver_url: str = ""
    configserver_token_file: str = ""
    cache_quota_bytes: int = 8 << 30
    segment_bytes: int = 64 << 20
    idle_timeout_seconds: float = 60.0
    max_sessions: int = 256
    upload_threads: int = 2

    def validate(self) -> None:
        if not 0 <= self.listen_port < 65536:
            raise ValueError("listen_port must be 0-65535")
        if self.segment_bytes < (1 << 20):
            raise ValueError("segment_bytes must be at least 1 MiB")
        if self.cache_quota_bytes < 2 * self.segment_bytes:
            raise ValueError("cache_quota_bytes must hold at least two segments")
        if self.idle_timeout_seconds <= 0:
            raise ValueError("idle_timeout_seconds must be positive")
