"""What an agent session (``session.Session``, ``basis.serve_basis``) works with.

Built once by the daemon and shared by every session: the settings that bound a
session, and the components it hands its frames and questions to. A session never
sees the daemon itself.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.pacing import TokenBucket
from procserver.barrier import Barriers
from procserver.cachespace import CacheSpace
from procserver.cycles import CycleBook
from procserver.metrics import ProcMetrics
from procserver.recvbuffers import ReceiveBuffers
from procserver.trust import TrustList
from procserver.uploader import Uploader
from procserver.vaultaccess import VaultAccess


@dataclass(frozen=True)
class SessionSettings:
    idle_timeout: float  # idle_timeout_seconds: the longest silence of the agent
    resume_window: float  # resume_window_seconds
    segment_bytes: int  # an HRL segment is closed at this size
    max_frame: int  # the largest frame accepted (announced in WELCOME)
    heartbeat_seconds: float  # HEARTBEAT interval offered to agents that speak it
    resync_range_blocks: int = 1 << 16  # fingerprints a resync basis computes at a time


@dataclass(frozen=True)
class SessionDeps:
    settings: SessionSettings
    sessionmaker: async_sessionmaker[AsyncSession]
    cache_dir: Path
    metrics: ProcMetrics
    trust: TrustList  # refuses machines, certificates and disks it does not trust
    cycles: CycleBook  # open and suspended cycles
    space: CacheSpace  # cache quota: reserve before writing (backpressure)
    buffers: ReceiveBuffers  # receive memory, bounded across sessions
    rate_limit: TokenBucket | None  # receive_bytes_per_second across sessions
    vaults: VaultAccess  # base checks and resync bases read the vault
    uploader: Uploader  # woken for new cycles; its points_changed for resync
    executor: Executor  # CPU work of resync (unsealing, hashing)
    barriers: Barriers = field(default_factory=Barriers)  # consistency groups' barriers
