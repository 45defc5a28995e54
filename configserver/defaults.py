"""What exists from the first start: the "default" replication policy and the secrets key.

Run at every start after the migrations; it only ever adds what is missing, so an
operator's changes to the default policy survive restarts.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from sqlalchemy.exc import IntegrityError

from configserver import db, sealed
from configserver.core import Core

log = structlog.get_logger("configserver.defaults")

DEFAULT_POLICY = "default"
# As Azure Site Recovery's defaults where it has one: RPO alert after 15 min, 24 h of
# recovery points, an app-consistent point every 4 h. A crash-consistent point every
# minute; 64 KiB blocks as the vault's own default (vault/repo.py DEFAULT_BLOCK_SIZE).
POLICY_DEFAULTS: dict[str, int] = {
    "rpo_threshold_seconds": 15 * 60,
    "retention_hours": 24,
    "app_consistent_frequency_seconds": 4 * 3600,
    "crash_consistent_interval_seconds": 60,
    "block_size": 64 * 1024,
}


async def ensure_default_policy(core: Core) -> None:
    async with core.sessionmaker() as s:
        if await s.get(db.Policy, DEFAULT_POLICY) is not None:
            return
        now = core.clock()
        d = POLICY_DEFAULTS
        s.add(db.Policy(name=DEFAULT_POLICY, rpo_threshold_s=d["rpo_threshold_seconds"],
                        retention_hours=d["retention_hours"],
                        app_consistent_frequency_s=d["app_consistent_frequency_seconds"],
                        crash_consistent_interval_s=d["crash_consistent_interval_seconds"],
                        block_size=d["block_size"], created=now, updated=now))
        try:
            await s.commit()
        except IntegrityError:  # another server on the same database made it first
            return
    log.info("policy_created", policy=DEFAULT_POLICY, **POLICY_DEFAULTS)


async def ensure_defaults(core: Core, secrets_key_path: Path) -> None:
    await ensure_default_policy(core)
    await sealed.ensure_key(core, secrets_key_path)
