"""The configuration server's catalog: SQLAlchemy 2 models.

Times are UNIX seconds (float) in the database and ISO 8601 UTC in the API.
The schema is owned by Alembic (``configserver/migrations``); a test checks
that the migrations and these models agree on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from configserver.modelbase import Base as Base  # re-exported: db.Base, migrations


class Registration(Base):
    """The vault this configuration server is registered with (one row, id 1)."""

    __tablename__ = "registration"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vault_id: Mapped[str] = mapped_column(String(64))
    vault_url: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[float] = mapped_column(Float)
    key_expires: Mapped[float] = mapped_column(Float)
    skew_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    vault_key_file: Mapped[str | None] = mapped_column(Text, nullable=True)  # a path, never a key


class RecoveryPoint(Base):
    __tablename__ = "recovery_points"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    machine: Mapped[str] = mapped_column(String(255), index=True)
    created: Mapped[str] = mapped_column(String(40), index=True)
    consistency: Mapped[str] = mapped_column(String(16))
    doc: Mapped[str] = mapped_column(Text)
    received: Mapped[float] = mapped_column(Float)


class PointVerification(Base):
    """A recovery point's last verification (configserver/verifyjob.py); the row goes when
    the point leaves the vault."""

    __tablename__ = "point_verifications"
    point_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    machine: Mapped[str] = mapped_column(String(255), index=True)  # "" if unknown
    verified: Mapped[float] = mapped_column(Float)
    ok: Mapped[bool] = mapped_column(Boolean)
    damaged: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{object, reason}]


class ProcessServer(Base):
    __tablename__ = "process_servers"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(40), default="")
    registered_at: Mapped[float] = mapped_column(Float)
    last_contact: Mapped[float] = mapped_column(Float)
    cache_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_free_ratio: Mapped[float] = mapped_column(Float, default=1.0)
    backlog_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    backlog_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    throughput_bps: Mapped[float] = mapped_column(Float, default=0.0)
    sessions: Mapped[int] = mapped_column(Integer, default=0)
    refresh_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Per machine, the cycles acknowledged to its agent not yet whole in the vault, as of
    # the last heartbeat (None: the process server does not report them).
    pending_cycles: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    heartbeats: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Since when its uploads to the vault fail without a success, and the newest error,
    # as of the last heartbeat (None: they do not).
    storage_failing_since: Mapped[float | None] = mapped_column(Float, nullable=True)
    storage_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Policy(Base):
    __tablename__ = "policies"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    rpo_threshold_s: Mapped[int] = mapped_column(Integer)
    retention_hours: Mapped[int] = mapped_column(Integer)
    app_consistent_frequency_s: Mapped[int] = mapped_column(Integer)
    crash_consistent_interval_s: Mapped[int] = mapped_column(Integer)
    block_size: Mapped[int] = mapped_column(Integer)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    # The agents' send limit (work_mbps, off_mbps, work_days, work_hours); None: each
    # agent's own mobility.toml limits apply.
    send_limit: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Machine(Base):
    __tablename__ = "machines"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    ip: Mapped[str] = mapped_column(String(64))
    # where push installs reach its sshd (configserver/install.py)
    ssh_port: Mapped[int] = mapped_column(Integer, default=22, server_default="22")
    os_type: Mapped[str] = mapped_column(String(16))
    os_name: Mapped[str] = mapped_column(String(64), default="")
    os_version: Mapped[str] = mapped_column(String(32), default="")
    kernel: Mapped[str] = mapped_column(String(64), default="")
    disks: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    process_server: Mapped[str | None] = mapped_column(String(255), nullable=True)
    account: Mapped[str | None] = mapped_column(String(64), nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created: Mapped[float] = mapped_column(Float)
    last_contact: Mapped[float | None] = mapped_column(Float, nullable=True)
    agent_version: Mapped[str] = mapped_column(String(40), default="")
    # Its SSH host key (OpenSSH public key line) for push installs: recorded on first use
    # ("tofu") or given by the operator ("operator"); None: the next install trusts the
    # first key it sees (configserver/install.py).
    host_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    host_key_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    host_key_recorded: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Its agent's change trackers as its last heartbeat reported them: disk ->
    # {"tracker", "verified_at", "missed_blocks"} (the tracker_missed_writes alert).
    tracker_report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The SMBIOS UUID its agent reports (mobility/hostid.py): the original machine's,
    # which a failover's recovered copy does not share (configserver/hostroles.py).
    host_id: Mapped[str | None] = mapped_column(String(36), nullable=True)


class Certificate(Base):
    """Every certificate the CA issued; revocation is by serial."""

    __tablename__ = "certificates"
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # agent | procserver
    issued_at: Mapped[float] = mapped_column(Float)
    not_after: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Account(Base):
    """A push-install account; the secret is sealed under a key outside the database."""

    __tablename__ = "accounts"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # password | ssh-key
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class ReplicatedItem(Base):
    __tablename__ = "replicated_items"
    machine: Mapped[str] = mapped_column(String(63), primary_key=True)
    policy: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    health: Mapped[str] = mapped_column(String(16), default="normal")
    health_errors: Mapped[list[str]] = mapped_column(JSON, default=list)
    initial_progress: Mapped[float] = mapped_column(Float, default=0.0)
    resync_progress: Mapped[float | None] = mapped_column(Float, nullable=True)
    disk_progress: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    latest_point: Mapped[str | None] = mapped_column(String(64), nullable=True)
    latest_point_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    latest_app_point: Mapped[str | None] = mapped_column(String(64), nullable=True)
    latest_app_point_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    # Failover (configserver/recovery.py, configserver/failover.py): the recovery settings
    # as the operator set them (None: every default), the last drill (test failover) and
    # the failover under way or done, each as its job records it.
    recovery: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    last_drill: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    failover: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Job(Base):
    """A durable job: its steps and their states live here, so a restart resumes it."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(255), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    steps: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class InstallRequest(Base):
    """A push install, upgrade or uninstall of a machine's agent that its job asked of a
    process server (configserver/install.py): the process server claims it, runs it over
    SSH and reports each step (``steps``: name -> {state, message}) until it is done."""

    __tablename__ = "install_requests"
    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    machine: Mapped[str] = mapped_column(String(63))
    action: Mapped[str] = mapped_column(String(16))  # install | upgrade | uninstall
    procserver: Mapped[str] = mapped_column(String(255), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)  # no secret in here
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending|claimed|done|failed
    steps: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    claimed: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated: Mapped[float] = mapped_column(Float)


class Event(Base):
    """Alerts and notable events; an alert is active until its condition clears."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[float] = mapped_column(Float, index=True)
    severity: Mapped[str] = mapped_column(String(16))  # info | warning | critical
    code: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(255), index=True)
    message: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    cleared_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class NotifyChannel(Base):
    """Where alert raise/clear notices go (configserver/api_notify.py): a webhook or an
    SMTP mailbox, for the severities listed; its secret is sealed (configserver/sealed.py)."""

    __tablename__ = "notify_channels"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # webhook | email
    severities: Mapped[list[str]] = mapped_column(JSON)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)  # no secret in here
    secret: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class NotifyOutbox(Base):
    """One notice for one channel, written in the transaction that raised or cleared the
    alert, so a restart loses none; delivered at least once (configserver/notifydeliver.py)."""

    __tablename__ = "notify_outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(64), index=True)
    notice: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[float] = mapped_column(Float, index=True)
    delivered: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


# the tables of recovery plans and of consistency groups, on Base
from configserver import groupmodels, planmodels  # noqa: E402,F401
