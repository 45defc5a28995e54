"""The process server's typed configuration (one flat TOML file).

The vault key: ``vault_key_file``, and/or the vault passphrase from
``vault_passphrase_file`` or the environment variable ``vault_passphrase_env`` (one of
the two), as every vault verb takes them (``--key-file``, ``--passphrase-file``,
``--passphrase-env``). At least one of them must be given; any key slot either opens
will do. ``procserver.vaultaccess.key_material`` reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from common.names import is_name
from common.pacing import Schedule
from vault.pack import FRAME_BYTES, MAX_FRAME, ZSTD_LEVEL, ZSTD_LEVELS
from wire.protocol import DEFAULT_PORT


@dataclass(frozen=True)
class ProcServerConfig:
    data_dir: str
    vault_url: str
    # The vault key (see the module's docstring): a key file ("": none, the passphrase
    # alone; the key must be written, so that dropping it by mistake is an error)
    # and/or a passphrase.
    vault_key_file: str
    tls_cert: str
    tls_key: str
    tls_ca: str
    vault_passphrase_file: str = ""
    vault_passphrase_env: str = ""
    listen_host: str = "127.0.0.1"
    listen_port: int = DEFAULT_PORT
    # HOST:PORT machines reach this process server at, when it is not listen_host and the
    # port (NAT, a forwarded port, a name for a listener on all addresses); "" = those
    advertise_address: str = ""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9444
    configserver_url: str = ""
    configserver_token_file: str = ""
    cache_quota_bytes: int = 8 << 30
    segment_bytes: int = 64 << 20
    idle_timeout_seconds: float = 60.0
    max_sessions: int = 256
    upload_threads: int = 2
    # Connections whose TLS handshake is not finished: at most this many in all and
    # from one address; more are closed at once. The handshake must end in this time.
    max_handshakes: int = 256
    max_handshakes_per_host: int = 64
    handshake_timeout_seconds: float = 10.0
    # A cycle whose connection broke stays resumable this long (agents that resume).
    resume_window_seconds: float = 600.0
    # Received bytes waiting for the cache writers, across sessions (each session may
    # always have 1 MiB); past that, reading stops and TCP slows the agents down.
    receive_buffer_bytes: int = 64 << 20
    # Cache writes of all sessions together, in bytes per second (0: unlimited).
    receive_bytes_per_second: int = 0
    # Heartbeats to the configuration server (with configserver_url): this server's name
    # there ("" = the host name) and how often it reports its health.
    name: str = ""
    heartbeat_interval_seconds: float = 30.0
    # How often the policies of the machines assigned here are pulled (with
    # configserver_url) and their retention applied to the vault.
    policy_interval_seconds: float = 300.0
    # Upload bandwidth into the vault (as ASR's process-server throttling), in Mbit/s:
    # during work_hours on work_days, and outside them. 0: unlimited.
    upload_limit_work_mbps: float = 0.0
    upload_limit_off_mbps: float = 0.0
    work_days: str = "mon-fri"
    work_hours: str = "08:00-18:00"
    # The vault's block index: in memory while it is estimated to fit in this many bytes
    # (about 220 a block), past that in a table on local disk, <data_dir>/index/, kept
    # between starts (vault/indexdb.py). 0: always on disk.
    index_memory_bytes: int = 256 << 20
    # A resync basis reads a point back and sends its fingerprints this many blocks at a
    # time (vault/fpstream.py): about 400 bytes a block of the range are held, whatever
    # the disk's size (65536: one MAP frame, some 25 MiB).
    resync_range_blocks: int = 1 << 16
    # In a vault of format 3, new blocks are sealed together in frames of up to this
    # many bytes of blocks, compressed as one (docs/FORMAT.md §5.1): larger frames make
    # a smaller vault; a read of one block (FETCH, instant recovery, a sparse restore)
    # decrypts and decompresses its whole frame. 0: every block sealed alone.
    pack_frame_bytes: int = FRAME_BYTES
    # The zstd level new packs are compressed at, 1 to 19: higher stores less and costs
    # more CPU per byte uploaded (README, "Compression"); readers do not depend on it.
    pack_zstd_level: int = ZSTD_LEVEL

    def validate(self) -> None:
        if not (self.vault_key_file or self.vault_passphrase_file
                or self.vault_passphrase_env):
            raise ValueError("give the vault key: vault_key_file, vault_passphrase_file or "
                             "vault_passphrase_env")
        if self.vault_passphrase_file and self.vault_passphrase_env:
            raise ValueError("give one of vault_passphrase_file and vault_passphrase_env, "
                             "not both")
        if self.vault_passphrase_env and not os.environ.get(self.vault_passphrase_env):
            raise ValueError(f"vault_passphrase_env: environment variable "
                             f"{self.vault_passphrase_env} is not set or empty")
        if not 0 <= self.listen_port < 65536:
            raise ValueError("listen_port must be 0-65535")
        if self.advertise_address and not _host_port(self.advertise_address):
            raise ValueError(f"advertise_address {self.advertise_address!r} is not HOST:PORT "
                             "(e.g. ps1.example.net:9443 or [fd00::7]:9443)")
        if self.segment_bytes < (1 << 20):
            raise ValueError("segment_bytes must be at least 1 MiB")
        if self.cache_quota_bytes < 2 * self.segment_bytes:
            raise ValueError("cache_quota_bytes must hold at least two segments")
        if self.idle_timeout_seconds <= 0:
            raise ValueError("idle_timeout_seconds must be positive")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if not 1 <= self.max_handshakes_per_host <= self.max_handshakes:
            raise ValueError("max_handshakes_per_host must be 1 to max_handshakes")
        if self.handshake_timeout_seconds <= 0:
            raise ValueError("handshake_timeout_seconds must be positive")
        if self.resume_window_seconds < 0:
            raise ValueError("resume_window_seconds must not be negative")
        if self.receive_buffer_bytes < (1 << 20):
            raise ValueError("receive_buffer_bytes must be at least 1 MiB")
        if self.receive_bytes_per_second < 0:
            raise ValueError("receive_bytes_per_second must not be negative")
        if self.index_memory_bytes < 0:
            raise ValueError("index_memory_bytes must not be negative")
        if not 1 <= self.resync_range_blocks <= 1 << 24:
            raise ValueError("resync_range_blocks must be 1 to 16777216 (65536: one MAP "
                             "frame of fingerprints)")
        if not 0 <= self.pack_frame_bytes <= MAX_FRAME:
            raise ValueError(f"pack_frame_bytes must be 0 (every block alone) to {MAX_FRAME} "
                             f"(8 MiB); default {FRAME_BYTES}")
        if self.pack_zstd_level not in ZSTD_LEVELS:
            raise ValueError(f"pack_zstd_level must be {ZSTD_LEVELS.start} to "
                             f"{ZSTD_LEVELS.stop - 1}; default {ZSTD_LEVEL}")
        self.upload_schedule()  # raises ValueError naming the bad setting
        if self.heartbeat_interval_seconds <= 0:
            raise ValueError("heartbeat_interval_seconds must be positive")
        if self.policy_interval_seconds <= 0:
            raise ValueError("policy_interval_seconds must be positive")
        if self.name and not is_name(self.name):
            raise ValueError("name must be 1-63 letters, digits, '.', '_' or '-', starting "
                             "with a letter or digit")

    def upload_schedule(self) -> Schedule:
        return Schedule.from_mbps(self.upload_limit_work_mbps, self.upload_limit_off_mbps,
                                  self.work_days, self.work_hours)


def _host_port(text: str) -> bool:
    """Whether ``text`` is HOST:PORT (an IPv6 host in brackets) with a port 1-65535."""
    host, sep, port = text.rpartition(":")
    if host.startswith("["):
        host = host.removeprefix("[").removesuffix("]") if host.endswith("]") else ""
    elif ":" in host:
        return False
    return bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535
                and not any(c.isspace() for c in host))
