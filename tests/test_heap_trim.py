"""The process server gives freed heap back to the system (procserver/heap.py).

A soak showed its RSS climbing while its Python objects stayed flat: glibc kept what
was freed. These tests hold the two remedies on the real C library: freed pages in the
middle of an arena are released by a trim, a freed large buffer does not raise the mmap
threshold (so the next large buffer is its own mapping again), a buffer of a pack's
size is reused, not faulted in again, and a real process server trims after it writes
a point, and during a cycle after its checkpoints."""

from __future__ import annotations

import asyncio
import ctypes
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from procserver import db
from procserver.heap import anonymous_rss, trim_heap
from procserver.server import ProcServer
from tests.helpers import (
    Pki,
    agent_config,
    make_agent,
    make_disk,
    proc_config,
    running_procserver,
)
from tests.test_resume import frame_bytes, proxied, random_disk

BUF = 64 << 10  # below the mmap threshold: from an arena's heap


def test_trim_releases_free_pages_inside_the_heap() -> None:
    result: dict[str, int] = {}

    def work() -> None:
        # 32 MiB of buffers written (resident), one in eight kept: the free space is in
        # the middle of the heap, where freeing alone never gives it back.
        bufs = [b"\x01" * BUF for _ in range(512)]
        kept = bufs[::8]
        del bufs
        result["before"] = anonymous_rss()
        result["released"] = trim_heap()
        result["after"] = anonymous_rss()
        del kept

    t = threading.Thread(target=work)
    t.start()
    t.join()
    freed = 512 * 7 // 8 * BUF  # 28 MiB
    assert result["released"] >= freed // 2, result
    assert result["after"] <= result["before"] - freed // 2, result


_LARGE_BUFFERS = """
import ctypes
from procserver.heap import MMAP_THRESHOLD, return_large_buffers

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
mapped = lambda: int(libc.mallinfo2().hblkhd)
assert return_large_buffers()
big = b"\\x01" * (8 << 20)
del big  # glibc's default would now take buffers up to 8 MiB from the heap
before = mapped()
held = b"\\x01" * (4 * MMAP_THRESHOLD)
grown = mapped() - before
del held
print(grown, 4 * MMAP_THRESHOLD, mapped() - before)
"""


def test_a_freed_large_buffer_leaves_the_next_one_mapped() -> None:
    # A fresh interpreter, as a process server starts: in this one, earlier tests have
    # left large free chunks in the heap, which malloc reuses whatever the threshold.
    out = subprocess.run([sys.executable, "-c", _LARGE_BUFFERS], check=True, text=True,
                         capture_output=True, cwd=Path(__file__).parent.parent).stdout
    grown, size, left = (int(x) for x in out.split())
    assert grown >= size  # its own mapping ...
    assert left == 0  # ... unmapped when freed


_REUSED = """
import resource
import threading
from procserver.heap import return_large_buffers
from vault.writer import PACK_TARGET

assert return_large_buffers()
size = PACK_TARGET + (1 << 20)  # a sealed pack of incompressible blocks, and a frame

def faults_taking_it_again(out):
    first = bytearray(size)  # faulted in once
    del first
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    again = bytearray(size)
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    del again

out = []
faults_taking_it_again(out)  # the event loop's thread: the main arena
t = threading.Thread(target=faults_taking_it_again, args=(out,))  # a sealing worker's
t.start()
t.join()
print(size // 4096, *out)
"""


def test_a_pack_sized_buffer_freed_is_reused_not_faulted_in_again() -> None:
    # Sealing allocates a pack-sized buffer per pack: taken from a fresh mapping each
    # time, every page of it is a page fault (2 304 for this size), on every pack.
    out = subprocess.run([sys.executable, "-c", _REUSED], check=True, text=True,
                         capture_output=True, cwd=Path(__file__).parent.parent).stdout
    pages, main, worker = (int(x) for x in out.split())
    assert main < pages // 20, out
    assert worker < pages // 20, out


async def test_procserver_trims_after_a_point(tmp_path: Path, pki: Pki,
                                              procserver: ProcServer) -> None:
    def trims() -> float:
        return procserver.metrics.registry.get_sample_value(
            "siterecovery_procserver_heap_trims_total") or 0.0

    assert trims() == 0
    disk = tmp_path / "d.img"
    make_disk(disk, 4 << 20, seed=1)
    agent = make_agent(agent_config(tmp_path, pki, "heap01", procserver.port, {"sda": disk}))
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    await procserver.wait_point(r.cycle)
    heap = procserver.heap
    async with asyncio.timeout(30), heap.changed:
        await heap.changed.wait_for(lambda: heap.done >= 1)
    assert trims() == 1
    released = procserver.metrics.registry.get_sample_value(
        "siterecovery_procserver_heap_released_bytes_total")
    assert released is not None and released >= 0


async def test_procserver_trims_during_a_cycle_before_its_point(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    """An initial copy hours long writes its point only at its end: the process server
    trims after its checkpoints too (at most once per interval), not only after points.
    Here the agent's link stops half way through its cycle, with segments checkpointed
    and no point yet."""
    url, key = vault_at
    cfg = proc_config(tmp_path, pki, url, key, segment_bytes=1 << 20)
    disk = tmp_path / "d.img"
    random_disk(disk, 8 << 20, seed=2)
    async with running_procserver(cfg) as ps, proxied(ps) as proxy:
        proxy.pause_at = frame_bytes(8 << 20) // 2
        agent = make_agent(agent_config(tmp_path, pki, "heap02", proxy.port, {"sda": disk}))
        sending = asyncio.create_task(agent.replicate_once())
        try:
            heap = ps.heap
            async with asyncio.timeout(60), heap.changed:
                await heap.changed.wait_for(lambda: heap.done >= 1)
            assert proxy.paused.is_set()  # the cycle is still under way
            async with ps.sessionmaker() as s:
                assert (await s.execute(select(db.Cycle.point_id))).scalars().all() == [None]
            proxy.reset_all()  # the link comes back: the agent resumes, the point is written
            r = await sending
        finally:
            if not sending.done():
                sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            agent.close()
        await ps.wait_point(r.cycle)
    assert r.resumes >= 1


@pytest.fixture(autouse=True)
def _glibc() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        pytest.fail("these tests need glibc (the C library of every supported platform)")
