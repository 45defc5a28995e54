"""The configuration server's typed configuration (one flat TOML file)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vault.memory import DEFAULT_MEMORY_MIB, check_memory_mib


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class ConfigServerConfig:
    data_dir: str
    # The admin API: loopback only, bearer token.
    listen_host: str = "127.0.0.1"
    listen_port: int = 9440
    # The site listener (mutual TLS): agents enroll, pull settings and report progress;
    # process servers heartbeat and report points. site_port = -1 turns it off.
    site_host: str = "127.0.0.1"
    site_port: int = 9441
    site_names: list[str] = field(default_factory=list)  # extra names for its certificate
    database_url: str = ""
    token_file: str = ""
    internal_token_file: str = ""
    passphrase_file: str = ""
    secrets_key_file: str = ""
    vault_key_file: str = ""
    # With vault_key_file: the vault this server registers itself with at start, unless it
    # is registered already (configserver/selfregister.py; the embedded installation's)
    vault_url: str = ""
    agent_cert_days: float = 365.0  # lifetime of agent certificates; renew before it ends
    alert_interval_seconds: float = 30.0
    # An item with no successful drill (test failover) for this long raises drill_overdue
    # (ASR warns after 180 days); counted from protection when it never had one.
    drill_warning_days: float = 180.0
    # Uploads to the vault failing without a break for this long raise
    # procserver_storage_failing (the process server's health turns critical).
    storage_alert_seconds: float = 300.0
    # Verification of recovery points (configserver/verifyjob.py): a run is queued every
    # verify_interval_hours (0, the default: only by hand; 24: daily); it verifies new
    # points and, of those last verified verify_reverify_days ago or more, at most
    # verify_daily_share_percent of the retained points, so the work is spread over days.
    verify_interval_hours: float = 0.0
    verify_reverify_days: float = 30.0
    verify_daily_share_percent: float = 10.0
    # A Prune the vault job (configserver/gcjob.py) every prune_interval_hours (0, the
    # default: only by hand); it never forgets a point any policy's retention keeps.
    prune_interval_hours: float = 0.0
    # Its memory budget in MiB (vault/memory.py): past it the garbage collection keeps the
    # live block ids and the index in temporary files (0: always).
    gc_memory_mib: int = DEFAULT_MEMORY_MIB
    # Failover: how long the point 'latest' waits for the process server's upload, how
    # long a failover waits for the source's agent to take a last cycle and shut down,
    # and how long a target that boots machines (libvirt) waits for the boot proof.
    failover_drain_timeout_seconds: float = 1800.0
    failover_shutdown_timeout_seconds: float = 600.0
    failover_boot_timeout_seconds: float = 600.0
    # A process server silent this long loses its machines to a healthy one
    # (configserver/pshealth.py); the procserver_heartbeat_missing alert's 15 minutes.
    # 0: no automatic moves (the alert still fires; move machines by hand).
    procserver_failover_seconds: float = 900.0
    # Failover targets (docs/REFERENCE.md §13). The folder target is always there.
    recovered_dir: str = ""  # the folder target's root (default DATA_DIR/recovered)
    folder_format: str = "raw"  # raw | vhd | qcow2
    libvirt_uri: str = ""  # e.g. qemu:///system; empty: no libvirt target
    libvirt_image_dir: str = ""  # recovered disks (default DATA_DIR/libvirt)
    libvirt_network: str = "default"  # the network failovers join
    libvirt_drill_subnet: str = "10.213.0.0/24"  # the isolated network drills join
    libvirt_accel: str = "auto"  # auto (KVM when it works) | kvm | qemu
    azure_target_url: str = ""  # azure://CONTAINER[/PREFIX]; empty: no Azure target
    azure_target: dict[str, Any] = field(default_factory=dict)  # AzureSettings' fields

    def validate(self) -> None:
        if not _is_loopback(self.listen_host):
            raise ValueError("the admin API listens on loopback only (listen_host = 127.0.0.1); "
                             "agents and process servers use the site listener (site_host)")
        for name, port in (("listen_port", self.listen_port), ("site_port", self.site_port)):
            if not -1 <= port < 65536:
                raise ValueError(f"{name} must be 0-65535 (site_port -1: off)")
        if not 0 < self.agent_cert_days <= 3650:
            raise ValueError("agent_cert_days must be more than 0 and at most 3650")
        if self.alert_interval_seconds <= 0:
            raise ValueError("alert_interval_seconds must be positive")
        if not 0 < self.drill_warning_days <= 3650:
            raise ValueError("drill_warning_days must be more than 0 and at most 3650")
        if not 0 < self.storage_alert_seconds <= 86400:
            raise ValueError("storage_alert_seconds must be more than 0 and at most 86400")
        if not 0 <= self.verify_interval_hours <= 24 * 366:
            raise ValueError("verify_interval_hours must be 0 (off) to 8784 (a year)")
        if not 0 < self.verify_reverify_days <= 3650:
            raise ValueError("verify_reverify_days must be more than 0 and at most 3650")
        if not 0 <= self.prune_interval_hours <= 24 * 366:
            raise ValueError("prune_interval_hours must be 0 (off) to 8784 (a year)")
        check_memory_mib(self.gc_memory_mib, "gc_memory_mib")
        if not 0 < self.verify_daily_share_percent <= 100:
            raise ValueError("verify_daily_share_percent must be more than 0 and at most 100")
        for name in ("failover_drain_timeout_seconds", "failover_shutdown_timeout_seconds",
                     "failover_boot_timeout_seconds"):
            if not 0 < getattr(self, name) <= 86400:
                raise ValueError(f"{name} must be more than 0 and at most 86400 (a day)")
        if not 0 <= self.procserver_failover_seconds <= 86400:
            raise ValueError("procserver_failover_seconds must be 0 (no automatic moves) to "
                             "86400 (a day)")
        if self.folder_format not in ("raw", "vhd", "qcow2"):
            raise ValueError("folder_format must be raw, vhd or qcow2")
        if self.libvirt_accel not in ("auto", "kvm", "qemu"):
            raise ValueError("libvirt_accel must be auto, kvm or qemu")
        if self.azure_target_url and not self.azure_target_url.startswith("azure://"):
            raise ValueError("azure_target_url must be azure://CONTAINER[/PREFIX]")
        if self.vault_url and not os.path.isabs(self.vault_key_file):
            raise ValueError("vault_url needs vault_key_file, the absolute path of the "
                             "vault's key file: the server registers itself with it")
        if self.database_url and not self.database_url.startswith(
                ("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("database_url must be sqlite+aiosqlite:///PATH or "
                             "postgresql+asyncpg://USER@HOST/DB")

    def _path(self, configured: str, default: str) -> Path:
        return Path(configured or Path(self.data_dir) / default)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{Path(self.data_dir) / 'config.db'}"

    @property
    def token_path(self) -> Path:
        return self._path(self.token_file, "api-token")

    @property
    def internal_token_path(self) -> Path:
        return self._path(self.internal_token_file, "internal-token")

    @property
    def passphrase_path(self) -> Path:
        """The enrollment passphrase agents present (as ASR's configuration-server one)."""
        return self._path(self.passphrase_file, "enrollment-passphrase")

    @property
    def secrets_key_path(self) -> Path:
        """The key that seals push-install account secrets; never in the database."""
        return self._path(self.secrets_key_file, "secrets.key")

    @property
    def ca_dir(self) -> Path:
        return Path(self.data_dir) / "ca"
