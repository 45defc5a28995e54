"""The configuration server's typed configuration (one flat TOML file)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ConfigServerConfig:
    data_dir: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 9440
    database_url: str = ""
    token_file: str = ""
    internal_token_file: str = ""

    def validate(self) -> None:
        try:
            loopback = ipaddress.ip_address(self.listen_host).is_loopback
        except ValueError:
            loopback = self.listen_host == "localhost"
        if not loopback:
            raise ValueError("the admin API listens on loopback only (listen_host = 127.0.0.1)")
        if not 0 <= self.listen_port < 65536:
            raise ValueError("listen_port must be 0-65535")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{Path(self.data_dir) / 'config.db'}"

    @property
    def token_path(self) -> Path:
        return Path(self.token_file or Path(self.data_dir) / "api-token")

    @property
    def internal_token_path(self) -> Path:
        return Path(self.internal_token_file or Path(self.data_dir) / "internal-token")

    @property
    def ca_dir(self) -> Path:
        return Path(self.data_dir) / "ca"
