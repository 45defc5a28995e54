"""Hydration: copy every block of a served point disk that is not in its overlay yet,
in the background, at a bounded rate, until the overlay is the whole disk image.

It walks the point's packs in order, fetching spans of each pack's missing blocks
(HYDRATE_SPAN pack bytes at most, less at a low rate) through the same path as
on-demand reads, so a block a guest asked for is not fetched twice. The rate (a
``TokenBucket``, common/pacing.py) is charged with the pack bytes of each span before
it is read from the vault; a guest's own reads are not paced. Progress is the overlay's
present blocks of all blocks; a restarted server resumes from the overlay as it is
(blocks present there are never fetched again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from common.pacing import TokenBucket
from instant.pointdisk import PointDisk

log = structlog.get_logger("instant.hydrate")

HYDRATE_SPAN = 4 << 20
HYDRATE_PARALLEL = 3  # spans fetched at once: the store's latency overlaps


@dataclass(frozen=True)
class HydrationProgress:
    done: int  # blocks present in the overlay
    total: int  # blocks of the disk
    fetched_bytes: int  # pack bytes read from the vault by this run

    @property
    def complete(self) -> bool:
        return self.done == self.total


async def hydrate(disk: PointDisk, bucket: TokenBucket | None = None, *,
                  progress: Callable[[HydrationProgress], None] | None = None) -> None:
    """Fetch every missing block of ``disk`` into its overlay, then flush it. Errors of
    the vault (IntegrityError, store errors) raise: the overlay keeps what was done."""
    ov = disk.overlay
    start_done = ov.present_count
    log.info("hydration_started", point=disk.point.id, disk=disk.disk, done=start_done,
             total=ov.nblocks)

    def report() -> None:
        if progress is not None:
            progress(HydrationProgress(ov.present_count, ov.nblocks, disk.fetched_bytes))

    report()
    # Spans of at most a quarter second's worth at the rate: the pace stays even.
    rate = bucket.schedule.rate_at(datetime.now()) if bucket is not None else 0
    span = max(1, min(HYDRATE_SPAN, int(rate / 4))) if rate > 0 else HYDRATE_SPAN
    running: set[asyncio.Task[None]] = set()

    async def settle(when: str) -> None:
        done, _ = await asyncio.wait(running, return_when=when)
        running.difference_update(done)
        for t in done:
            t.result()  # a failed span raises here
        report()

    try:
        for pack, count in enumerate(disk.pack_sizes()):
            pos = 0
            while pos < count:
                pos, entries, nbytes = disk.plan_span(pack, pos, span)
                if not entries:
                    continue  # nothing missing in that span
                if bucket is not None:
                    await bucket.take(nbytes)
                running.add(asyncio.create_task(disk.fetch(entries)))
                if len(running) >= HYDRATE_PARALLEL:
                    await settle(asyncio.FIRST_COMPLETED)
        if running:
            await settle(asyncio.ALL_COMPLETED)
    finally:
        for t in running:
            t.cancel()
        if running:
            await asyncio.wait(running)
    # Spans a guest's reads had in flight when the walk passed them are awaited here.
    await disk.ensure(list(ov.missing()))
    await disk.flush()
    report()
    log.info("hydration_complete", point=disk.point.id, disk=disk.disk, total=ov.nblocks,
             fetched_bytes=disk.fetched_bytes)
